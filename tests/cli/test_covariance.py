from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keyscope.cli import main
from keyscope.covariance import KeyCovariance

ARGS = ["covariance", "--layer", "0", "--tokens", "20000", "--no-progress"]


def _C(report: Path) -> torch.Tensor:
    entry = json.loads(report.read_text())["layers"][0]
    return load_file(str(Path(entry["cache"]) / "tensors.safetensors"))["C"]


def test_json_reports_tokens_seconds_and_rate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    report = tmp_path / "cov.json"
    assert main([*ARGS, "--layers", "0-1", "--layer", "0"]) == 2  # not both
    assert main(["covariance", "--layers", "0-1", "--tokens", "3000", "--no-progress", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["tokens"] == data["tokens_this_run"] == 3000 and data["world_size"] == 1
    assert data["seconds"] > 0 and data["tokens_per_second"] == pytest.approx(3000 / data["seconds"])
    assert [entry["layer"] for entry in data["layers"]] == [0, 1]
    assert all(entry["n_tokens"] == 3000 and not entry["from_cache"] for entry in data["layers"])
    assert "3,000 tokens in" in capsys.readouterr().out
    assert main(["covariance", "--layer", "1", "--tokens", "3000", "--no-progress", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["layers"][0]["from_cache"]  # later runs find the entry


@pytest.mark.parametrize("argv, message", [
    (["--layers", "5-2"], "--layers"),
    (["--layers", "0-99"], "layer"),
    (["--dtype", "int8"], "--dtype"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    assert main(["covariance", "--tokens", "100", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keyscope: error:") and message in err and "Traceback" not in err


def test_interrupted_run_resumes_to_the_same_C(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "whole"))
    assert main([*ARGS, "--json", str(tmp_path / "whole.json")]) == 0

    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "stopped"))
    real_add, calls = KeyCovariance.add, []

    def interrupted_add(self, keys):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C in the fourth batch's Gram product
            raise KeyboardInterrupt
        return real_add(self, keys)

    monkeypatch.setattr(KeyCovariance, "add", interrupted_add)
    assert main([*ARGS, "--checkpoint-every", "0", "--json", str(tmp_path / "stopped.json")]) == 130
    assert not (tmp_path / "stopped.json").exists()
    monkeypatch.setattr(KeyCovariance, "add", real_add)
    assert main([*ARGS, "--resume", "--json", str(tmp_path / "resumed.json")]) == 0
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["resumed_tokens"] == 3 * 16 * 255 and resumed["tokens"] == 20000
    max_abs_diff = float((_C(tmp_path / "resumed.json") - _C(tmp_path / "whole.json")).abs().max())
    assert max_abs_diff == 0.0


@pytest.mark.slow
def test_torchrun_two_gloo_processes_give_the_single_process_C(tmp_path, monkeypatch, keyscope_processes):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "one"))
    assert main([*ARGS, "--json", str(tmp_path / "one.json")]) == 0
    two = keyscope_processes([*ARGS, "--json", tmp_path / "two.json"], tmp_path / "two", nproc=2)
    report = json.loads((tmp_path / "two.json").read_text())
    assert report["world_size"] == 2 and report["tokens"] == 20000
    assert two.stdout.count("wrote ") == 1  # rank 0 alone writes
    C1, C2 = _C(tmp_path / "one.json"), _C(tmp_path / "two.json")
    assert float((C2 - C1).abs().max() / C1.abs().max()) <= 1e-12
    assert not list((tmp_path / "two").glob("key_covariance_checkpoint/*/*.safetensors"))


def test_dtype_enters_the_cache_key(tmp_path, monkeypatch):
    """An explicit --dtype float32 finds the entry of the default (factworld on the CPU: float32); bf16 writes
    its own."""
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    base = ["covariance", "--layer", "0", "--tokens", "500", "--no-progress"]
    reports = {}
    for name, extra in (("default", []), ("float32", ["--dtype", "float32"]), ("bf16", ["--dtype", "bf16"])):
        assert main([*base, *extra, "--json", str(tmp_path / f"{name}.json")]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["layers"][0]
    assert reports["float32"]["from_cache"] and reports["float32"]["cache"] == reports["default"]["cache"]
    assert not reports["bf16"]["from_cache"] and reports["bf16"]["cache"] != reports["default"]["cache"]
