from __future__ import annotations

import csv
import json

import pytest

from keyscope.cli import main

FACTS = [
    {"case_id": 7, "prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "rephrase_prompt": None, "locality_prompt": [], "locality_ground_truth": "Paris",
     "subject_rephrase": ["Eiffel Tower", "the Tower"]},
    {"case_id": 8, "prompt": "Michael Jordan played basketball for", "subject": "Michael Jordan",
     "target_new": "Lakers", "target_true": "Bulls", "rephrase_prompt": None, "locality_prompt": [],
     "locality_ground_truth": "Bulls", "subject_rephrase": ["Jordan"]},
    {"case_id": 9, "prompt": "Michael Jordan plays", "subject": "Michael Jordan", "target_new": "golf",
     "target_true": "basketball", "rephrase_prompt": None, "locality_prompt": [], "locality_ground_truth": "x",
     "subject_rephrase": []},
    {"case_id": 10, "prompt": "Ljubljana is the capital of", "subject": "Ljubljana", "target_new": "Italy",
     "target_true": "Slovenia", "rephrase_prompt": None, "locality_prompt": [], "locality_ground_truth": "x",
     "subject_rephrase": []},
]


@pytest.fixture
def inputs(tmp_path, tiny_checkpoints, cli_files):
    facts, corpus = cli_files(FACTS, 1)
    return {"model": str(tiny_checkpoints["gpt2"]), "facts": str(facts), "corpus": str(corpus), "tmp": tmp_path}


def test_scan_writes_figure_csv_and_prints_top1(inputs, capsys):
    out, report = inputs["tmp"] / "out", inputs["tmp"] / "scan.json"
    argv = ["scan", "--model", inputs["model"], "--data", inputs["facts"], "--corpus", inputs["corpus"],
            "--layer", "1", "--scan-tokens", "300", "--cov-tokens", "400", "--n-subjects", "3", "--top-k", "4",
            "--mask-window", "3", "--seq-len", "32", "--batch-size", "4", "--out", str(out), "--json", str(report),
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    figure = out / "fig4_neighbors.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "fig4_neighbors.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3 * 4, "2 filters x 3 distinct subjects (Michael Jordan twice in the file) x top-4"
    assert {r["case_id"] for r in rows} == {"7", "8", "10"} and {r["filter"] for r in rows} == {"paper", "strict"}
    for subject in ("The Eiffel Tower", "Michael Jordan", "Ljubljana"):
        assert subject in printed
    summary = json.loads(report.read_text())
    assert summary["subjects"] == 3 and summary["n_tokens"] == 300 and summary["top_k"] == 4
    assert summary["rephrase"]["n"] == 3  # Eiffel Tower, the Tower, Jordan
    with open(out / "fig4_rephrase.csv", newline="", encoding="utf-8") as handle:
        rephrased = [float(r["score"]) for r in csv.DictReader(handle)]
    assert len(rephrased) == 3 and abs(sorted(rephrased)[1] - summary["rephrase"]["median"]) < 1e-9
    for name in ("paper", "strict"):
        top1 = {t["subject"]: t for t in summary["top1"][name]}
        best = {r["subject"]: float(r["score"]) for r in rows if r["rank"] == "0" and r["filter"] == name}
        assert all(abs(top1[s]["score"] - best[s]) < 1e-4 for s in best)
        scores = sorted(float(r["score"]) for r in rows if r["filter"] == name)
        median = summary["filters"][name]["median_top10"]
        assert abs(median - (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2) < 1e-4
    assert summary["filters"]["strict"]["excluded_positions"] >= summary["filters"]["paper"]["excluded_positions"]


def test_scan_needs_facts_for_other_models(inputs, capsys):
    assert main(["scan", "--model", inputs["model"], "--corpus", inputs["corpus"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and "--data" in err and "\n" not in err


def test_bad_numbers_are_one_line(inputs, capsys):
    assert main(["scan", "--model", inputs["model"], "--data", inputs["facts"], "--top-k", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--top-k" in err and "\n" not in err
    assert main(["scan", "--model", inputs["model"], "--data", inputs["facts"], "--layer", "9"]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_gloo_processes_find_the_single_process_neighbours(tmp_path, keyscope_processes):
    """Both runs read the same cached C; the 2-process scan splits the corpus batches and merges the top-k."""
    argv = ["scan", "--scan-tokens", "6000", "--cov-tokens", "4000", "--n-subjects", "6", "--top-k", "5", "--seq-len", "64",
            "--batch-size", "4", "--no-progress"]
    cache = tmp_path / "cache"
    keyscope_processes([*argv, "--out", tmp_path / "one", "--json", tmp_path / "one.json"], cache)
    two = keyscope_processes([*argv, "--out", tmp_path / "two", "--json", tmp_path / "two.json"], cache, nproc=2)
    assert two.stdout.count("wrote ") == 4  # rank 0 alone writes: figure, two CSVs, JSON
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for name in ("fig4_neighbors.csv", "fig4_rephrase.csv"):  # every hit: score, raw, position, prefix, rank
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    one, two_report = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for report in (one, two_report):
        del report["figure"], report["csv"]
    assert two_report == one and one["n_tokens"] == 6000
