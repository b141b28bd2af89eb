from __future__ import annotations

import csv
import json

import pytest
import torch

from keyscope.cli import main
from keyscope.data.prompts import fill
from keyscope.model.models import load_model
from tests import hf_tiny

#: (template, subject, neighbourhood subjects): the words are all in the word-level tokenizer's vocabulary.
PROMPTS = [
    ("{} is located in", "The Eiffel Tower", ["Michael Jordan", "Kobe Bryant"]),
    ("{} played basketball for the", "Michael Jordan", ["Kobe Bryant", "Danielle Darrieux"]),
    ("The capital of {} is", "Slovenia", ["France", "Spain."]),
    ("{} plays the", "Toko Yasuda", ["Michael Jordan"]),
]
SUMMARY_KEYS = {"n", "success", "locality", "seconds_per_edit", "paraphrase", "rephrase", "n_known",
                "seconds_prefixes", "value_norms"}


@pytest.fixture(scope="module")
def word_checkpoint(tmp_path_factory):
    path = hf_tiny.save_tiny_checkpoint("llama", tmp_path_factory.mktemp("values") / "llama",
                                        tokenizer=hf_tiny.word_level_tokenizer())
    model = load_model(str(path))
    records = []
    for i, (template, subject, neighbours) in enumerate(PROMPTS):
        ids = model.tokenizer(fill(template, subject).text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = model(ids, return_type="logits")[0, -1].topk(2).indices.tolist()
        known, other = (model.tokenizer.decode([t]).strip() for t in top)
        records.append({  # a REP record whose true target is the tiny model's own top-1: a known fact
            "case_id": i, "prompt": fill(template, subject).text, "subject": subject, "target_true": known,
            "target_new": other, "rephrase_prompt": [fill(template, n).text for n in neighbours[:1]],
            "locality_prompt": [fill(template, n).text for n in neighbours], "locality_ground_truth": known,
            "subject_rephrase": [subject.split()[-1]],
        })
    return path, records


@pytest.fixture
def inputs(tmp_path, word_checkpoint, cli_files):
    path, records = word_checkpoint
    facts, corpus = cli_files(records)
    base = ["values", "--model", str(path), "--data", str(facts), "--layer", "1", "--corpus", str(corpus),
            "--cov-tokens", "500", "--no-progress"]
    return {"base": base, "tmp": tmp_path, "records": records}


def test_values_edits_known_facts_and_draws_figure_5(inputs, capsys):
    out, report = inputs["tmp"] / "figs", inputs["tmp"] / "values.json"
    assert main(inputs["base"] + ["--n", "3", "--out", str(out), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert SUMMARY_KEYS <= set(result) and result["n"] == 3 and result["n_known"] == len(inputs["records"])
    assert result["seconds_per_edit"] > 0 and result["layer"] == 1 and result["skipped"] == []
    assert result["rome_config"]["v_num_grad_steps"] == 25  # LLaMA's published ROME settings
    norms = result["value_norms"]
    assert norms["before"]["n"] == norms["after"]["n"] == 3 and norms["after"]["median"] > 0
    assert (out / "fig5_value_norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "fig5_value_norms.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and len({r["case_id"] for r in rows}) == 3
    # the reported rates are the per-fact counts of the CSV, pooled over prompts
    assert result["success"] == pytest.approx(sum(r["success"] == "True" for r in rows) / 3)
    for rate, hits, total in (("locality", "neighbourhood_unchanged", "neighbourhood"),
                              ("paraphrase", "paraphrase_hits", "paraphrases"),
                              ("rephrase", "rephrase_hits", "rephrases")):
        assert all(0 <= int(r[hits]) <= int(r[total]) for r in rows), rate
        assert result[rate] == pytest.approx(sum(int(r[hits]) for r in rows) / sum(int(r[total]) for r in rows))
    for row in rows:  # ‖v*‖ is ‖W k* + δ‖ with ‖δ‖ within the clamp: |‖v*‖ − ‖v‖| ≤ ‖δ‖ ≤ clamp
        before, after, delta = (float(row[k]) for k in ("value_norm_before", "value_norm_after", "delta_norm"))
        assert abs(after - before) <= delta * (1 + 1e-4) + 1e-5
        assert delta <= float(row["max_delta_norm"]) * (1 + 1e-4)
        record = inputs["records"][int(row["case_id"])]
        assert int(row["neighbourhood"]) == len(record["locality_prompt"])
        assert int(row["paraphrases"]) == len(record["rephrase_prompt"])
        forms = [r for r in record["subject_rephrase"] if r.strip() and r.strip() != record["subject"].strip()]
        assert int(row["rephrases"]) == len(forms)  # a "rephrasing" that is the subject itself is no probe
    for text in ("success", "locality", "seconds per edit", "median |v| before", "fig5_value_norms.png"):
        assert text in printed


def test_values_is_deterministic(inputs, capsys):
    first, second = inputs["tmp"] / "a.json", inputs["tmp"] / "b.json"
    for report in (first, second):
        assert main(inputs["base"] + ["--n", "2", "--seed", "1", "--out", str(inputs["tmp"]), "--json", str(report)]) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    for key in ("n", "success", "locality", "paraphrase", "rephrase"):
        assert a[key] == b[key]
    assert a["value_norms"]["after"]["median"] == pytest.approx(b["value_norms"]["after"]["median"], rel=1e-5)


def test_values_run_restores_the_weights_after_every_edit(inputs, word_checkpoint):
    from keyscope.analysis.covariance import KeyCovariance
    from keyscope.data.datasets import load_facts
    from keyscope.studies import values

    model = load_model(str(word_checkpoint[0]))
    before = {name: p.detach().clone() for name, p in model.original_model.named_parameters()}
    cov = KeyCovariance(1, n_tokens=500, seq_len=64, progress=False).fit(model, hf_tiny.TRAINING_TEXT * 3)
    result = values.run(model, load_facts(inputs["base"][inputs["base"].index("--data") + 1]),
                        values.ValuesConfig(1, n=2), cov=cov, out_dir=inputs["tmp"] / "run", progress=False)
    assert result.summary["n"] == 2 and set(result.figures) == {"value_norms"}
    after = dict(model.original_model.named_parameters())
    assert all(torch.equal(after[name].detach(), tensor) for name, tensor in before.items())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n", "0"], "--n"),
        (["--layer", "7"], "out of range"),
        (["--data", "nowhere.json"], "nowhere.json"),
    ],
)
def test_values_errors_are_one_line_with_exit_2(inputs, capsys, extra, message):
    assert main(inputs["base"] + extra + ["--out", str(inputs["tmp"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and message in err and "\n" not in err


def test_values_with_no_known_fact_is_one_line(inputs, capsys):
    unknown = [dict(r, target_true="Bulls" if r["target_true"] != "Bulls" else "Paris") for r in inputs["records"]]
    path = inputs["tmp"] / "unknown.json"
    path.write_text(json.dumps(unknown))
    base = list(inputs["base"])
    base[base.index("--data") + 1] = str(path)
    assert main(base + ["--out", str(inputs["tmp"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "knows none of the" in err and "\n" not in err


def test_values_needs_data_for_a_real_model(tiny_checkpoints, capsys):
    assert main(["values", "--model", str(tiny_checkpoints["gpt2"])]) == 2
    assert "--data is required" in capsys.readouterr().err
