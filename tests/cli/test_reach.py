from __future__ import annotations

import dataclasses
import json

import pytest

from keyscope.cli import main
from keyscope.editing.rep import REPConfig
from tests.cli.test_edit import FACTS


@pytest.fixture
def inputs(tmp_path, tiny_checkpoints, cli_files):
    facts, corpus = cli_files(FACTS)
    base = ["reach", "--model", str(tiny_checkpoints["llama"]), "--layer", "1", "--corpus", str(corpus),
            "--data", str(facts), "--scan-tokens", "400", "--cov-tokens", "500", "--top-k", "5", "--shuffles", "2",
            "--context-tokens", "30", "--no-progress", "--out", str(tmp_path / "out")]
    return {"base": base, "tmp": tmp_path}


@pytest.mark.parametrize("method", ["rome", "rome+rep"])
def test_reach_of_a_case_shows_top_missed_and_the_check(inputs, capsys, method):
    path = inputs["tmp"] / "reach.json"
    assert main(inputs["base"] + ["--case", "8", "--methods", method, "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["method"] == method and result["case_id"] == 8 and result["layers"] == [1]
    # the settings the run edited with, and only those: REP's for rome+rep alone
    assert result.get("rep_config") == (dataclasses.asdict(REPConfig()) if method == "rome+rep" else None)
    assert result["rome_config"]["v_num_grad_steps"] > 0
    assert len(result["top"]) == 5 and all(isinstance(t["prefix"], str) and isinstance(t["strength"], float)
                                           for t in result["top"])
    strengths = [t["strength"] for t in result["top"]]
    assert strengths == sorted(strengths, reverse=True)
    kinds = {m["kind"] for m in result["missed"]}
    assert {"rephrase", "shuffle", "long"} <= kinds and all(isinstance(m["strength"], float) for m in result["missed"])
    check = result["check"]
    for key in ("precision_at_k", "spearman", "random_kl_median", "top_kl_median"):
        assert key in check
    assert 0 <= check["precision_at_k"] <= 1 and check["n_random"] == 5
    assert "receive more of the edit than the median rephrasing" in result["verdict"]["text"]
    assert set(result["seconds"]) >= {"edit", "forms", "scan", "check", "total"}
    assert (inputs["tmp"] / "out" / "reach.png").stat().st_size > 0
    assert "verdict:" in printed and "precision@5" in printed and "[rephrase]" in printed


@pytest.mark.slow
def test_reach_of_many_factworld_facts_summarises_the_distribution(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    path, out = tmp_path / "many.json", tmp_path / "out"
    argv = ["reach", "--n", "2", "--scan-tokens", "2000", "--cov-tokens", "5000", "--top-k", "5", "--shuffles", "0",
            "--context-tokens", "0", "--no-progress", "--out", str(out), "--json", str(path)]
    assert main(argv) == 0
    result = json.loads(path.read_text())
    summary = result["summary"]
    assert summary["n"] + len(result["skipped"]) <= 2 and summary["n"] == len(result["edits"]) >= 1
    assert 0 <= summary["n_top_above_random"] <= summary["n"]
    assert summary["n_top_above_random"] == sum(e["top_kl_median"] > e["random_kl_median"] for e in result["edits"])
    assert (out / "reach_edits.csv").read_text().startswith("case_id,subject,")
    assert "edits" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--case", "8", "--top-k", "0"], "argument --top-k: must be at least 1"),
    (["--case", "8", "--methods", "memo"], "unknown method"),
    (["--case", "8", "--n", "3"], "--n takes"),
    (["--subject", "Michael Jordan"], "give --prompt, --target"),
])
def test_bad_input_is_one_line(inputs, capsys, extra, message):
    assert main(inputs["base"] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("keyscope: error:") and message in err and err.count("\n") == 1


def test_output_paths_are_checked_before_any_work(inputs, capsys):
    folder = inputs["tmp"] / "taken"
    folder.mkdir()
    assert main(inputs["base"] + ["--case", "8", "--json", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err and not (inputs["tmp"] / "cache").exists()
