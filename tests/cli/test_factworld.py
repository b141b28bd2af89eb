from __future__ import annotations

import json

import pytest

from keyscope.cli import main


@pytest.mark.slow
def test_factworld_info_prints_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "info.json"
    assert main(["factworld", "info", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"accuracy", "subjects", "relations", "facts", "layer", "n_layers", "tokenizer", "subject_tokens",
            "trace"} <= set(report)
    assert set(report["accuracy"]) == {"canonical", "trained_aliases", "alias_only", "shuffled", "long_context"}
    assert report["accuracy"]["canonical"] >= 0.99 and report["accuracy"]["trained_aliases"] >= 0.95
    assert report["n_layers"] >= 6 and report["layer"] >= 1 and report["tokenizer"] == "bpe"
    assert report["subject_tokens"]["median"] >= 4
    assert len(report["trace"]["indirect_effect"]) == report["n_layers"]
    printed = capsys.readouterr().out
    assert "canonical" in printed and f"default edit layer {report['layer']}" in printed


def test_factworld_info_on_a_non_factworld_model_is_one_line(tiny_checkpoints, capsys):
    assert main(["factworld", "info", "--model", str(tiny_checkpoints["llama"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and "not a factworld model" in err and "\n" not in err


def test_missing_model_directory_is_one_line(tmp_path, capsys):
    assert main(["factworld", "info", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and "\n" not in err
