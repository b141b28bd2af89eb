from __future__ import annotations

import json

import pytest

from keyscope.cli import main

FACTS = [
    {
        "case_id": i,
        "prompt": prompt,
        "subject": subject,
        "target_new": "Paris",
        "target_true": "Madrid",
        "rephrase_prompt": [],
        "locality_prompt": ["Kobe Bryant played for the"],
        "locality_ground_truth": "Lakers",
        "subject_rephrase": rephrase,
    }
    for i, (prompt, subject, rephrase) in enumerate([
        ("The Republic of Slovenia is a country in", "The Republic of Slovenia", ["Slovenia", "the Slovene state"]),
        ("Michael Jordan played basketball for the", "Michael Jordan", ["Jordan", "MJ", "Air Jordan"]),
        ("Autonomous University of Madrid, which is located in", "Autonomous University of Madrid",
         ["Madrid University", "the university in Madrid"]),
    ])
]


@pytest.fixture
def rep_file(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(FACTS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(
        "The quiet river runs past the old mill and the farmers sell bread at the market every morning. " * 8
        for _ in range(20)
    ))
    return path, corpus


def test_similarity_on_a_local_model(tiny_checkpoints, rep_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    facts, corpus = rep_file
    out, report = tmp_path / "figs", tmp_path / "sim.json"
    argv = ["similarity", "--model", str(tiny_checkpoints["llama"]), "--layer", "1", "--data", str(facts),
            "--corpus", str(corpus), "--cov-tokens", "2000", "--out", str(out), "--json", str(report)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["layer"] == 1 and set(result["perturbations"]) == {"rephrase", "shuffle", "shuffle_words", "long", "random"}
    assert result["perturbations"]["rephrase"]["n"] == 7
    for stats in result["perturbations"].values():
        assert stats["q10"] <= stats["median"] <= stats["q90"]
    for name in ("fig3_similarity.png", "fig3_pca.png", "fig3_similarity.csv"):
        assert (out / name).stat().st_size > 0
    assert "rephrase" in printed and "random" in printed
    assert "cache" in {p.name for p in tmp_path.iterdir()}  # C was cached under KEYSCOPE_CACHE


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layer", "99"], "out of range"),
        (["--data", "missing.json"], "missing.json"),
    ],
)
def test_similarity_bad_input_is_one_line(tiny_checkpoints, rep_file, tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    facts, corpus = rep_file
    base = ["similarity", "--model", str(tiny_checkpoints["llama"]), "--data", str(facts), "--corpus", str(corpus),
            "--cov-tokens", "500", "--out", str(tmp_path)]
    if "--data" in argv:
        base[base.index("--data") + 1] = str(tmp_path / argv[1])
        argv = []
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and message in err and "\n" not in err


def test_similarity_needs_data_for_a_real_model(tiny_checkpoints, capsys):
    assert main(["similarity", "--model", str(tiny_checkpoints["gpt2"])]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_long_contexts_from_a_small_wikitext_raw_file_outlast_the_facts(tiny_checkpoints, rep_file, tmp_path, capsys,
                                                                        monkeypatch):
    """The documents of ``--corpus`` used to be one iterator that the facts' long contexts drained: a WikiText-2-raw
    file (CRLF, blank lines dropped) shorter than the contexts asked for ended in ``ValueError: the long-context text
    is empty``. Now the contexts go on, and one warning line says from when on they reuse the corpus's text."""
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    facts, _ = rep_file
    article = " {title} is a song by the band . It was released as a single in 1999 and reached number one . \r\n"
    raw = tmp_path / "wiki.test.raw"
    raw.write_bytes("".join(f" = {t} = \r\n = = Release = = \r\n" + article.format(title=t) * 3
                            for t in ("Blue River", "Old Mill")).encode())
    report = tmp_path / "sim.json"
    argv = ["similarity", "--model", str(tiny_checkpoints["llama"]), "--layer", "1", "--data", str(facts),
            "--corpus", str(raw), "--cov-tokens", "200", "--out", str(tmp_path / "figs"), "--json", str(report), "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("keyscope: warning:")]
    assert len(warnings) == 1 and f"the corpus {raw} ran out after" in warnings[0] and "reuse its text" in warnings[0]
    assert json.loads(report.read_text())["perturbations"]["long"]["n"] == 2 * 3 * 3  # 3 facts, 3 contexts per source
