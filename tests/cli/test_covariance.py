from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keyscope.analysis.covariance import KeyCovariance
from keyscope.cli import main
from tests.cli.conftest import ROOT

ARGS = ["covariance", "--layer", "0", "--cov-tokens", "20000", "--no-progress"]


def _C(report: Path) -> torch.Tensor:
    entry = json.loads(report.read_text())["layers"][0]
    return load_file(str(Path(entry["cache"]) / "tensors.safetensors"))["C"]


def test_json_reports_tokens_seconds_and_rate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    report = tmp_path / "cov.json"
    assert main([*ARGS, "--layers", "0-1", "--layer", "0"]) == 2  # not both
    assert main(["covariance", "--layers", "0-1", "--cov-tokens", "3000", "--no-progress", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["tokens"] == data["tokens_this_run"] == 3000 and data["world_size"] == 1
    assert data["seconds"] > 0 and data["tokens_per_second"] == pytest.approx(3000 / data["seconds"])
    assert [entry["layer"] for entry in data["layers"]] == [0, 1]
    assert all(entry["n_tokens"] == 3000 and not entry["from_cache"] for entry in data["layers"])
    assert "3,000 tokens in" in capsys.readouterr().out
    assert main(["covariance", "--layer", "1", "--cov-tokens", "3000", "--no-progress", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["layers"][0]["from_cache"]  # later runs find the entry


@pytest.mark.parametrize("argv, message", [
    (["--layers", "5-2"], "--layers"),
    (["--layers", "0-99"], "layer"),
    (["--dtype", "int8"], "--dtype"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    assert main(["covariance", "--cov-tokens", "100", "--no-progress", *argv]) == 2
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
    base = ["covariance", "--layer", "0", "--cov-tokens", "500", "--no-progress"]
    reports = {}
    for name, extra in (("default", []), ("float32", ["--dtype", "float32"]), ("bf16", ["--dtype", "bf16"])):
        assert main([*base, *extra, "--json", str(tmp_path / f"{name}.json")]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["layers"][0]
    assert reports["float32"]["from_cache"] and reports["float32"]["cache"] == reports["default"]["cache"]
    assert not reports["bf16"]["from_cache"] and reports["bf16"]["cache"] != reports["default"]["cache"]


#: ``python DRIVER MODE STATUS_DIR ARGV…`` under torchrun: ``keyscope ARGV…`` with a failure planted on rank 1 —
#: ``shard``: a RuntimeError in its first batch of the corpus pass (before the ranks' all-reduce); ``late``: a
#: KeyscopeError after the command returned (rank 0 has written ``--json`` by then). Each rank writes its exit
#: status and end time into STATUS_DIR (a rank killed by torchrun writes none).
DRIVER = """
import os, sys, time
from pathlib import Path
import keyscope.analysis.covariance_job as job
from keyscope.cli import covariance, main
from keyscope._infra.errors import EmptyCorpus

mode, out, rank = sys.argv[1], Path(sys.argv[2]), os.environ["RANK"]
if rank == "1" and mode == "shard":
    def add_batch(*args):
        raise RuntimeError("out of memory in this shard")
    job.add_batch = add_batch
if rank == "1" and mode == "late":
    command = covariance.cmd_covariance
    def late(args):
        command(args)
        raise EmptyCorpus("a failure after the work")
    covariance.cmd_covariance = late
status = main(sys.argv[3:])
(out / f"rank{rank}").write_text(f"{status} {time.time()}")
sys.exit(status)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode, status, message", [
    ("shard", 1, "rank 1 of 2: RuntimeError: out of memory in this shard"),
    ("late", 2, "rank 1 of 2: a failure after the work"),
])
def test_a_failure_on_one_torchrun_rank_ends_both_with_one_line_each(tmp_path, mode, status, message):
    """Rank 1 fails alone; rank 0 hears of it at its next collective (the all-reduce after the pass, or the
    ranks' last meeting after the command) instead of waiting there, removes its ``--json``, and both exit with
    rank 1's status, each with its own ``keyscope: error:`` line, within seconds (gloo would wait 30 minutes)."""
    driver, report = tmp_path / "driver.py", tmp_path / "out" / "cov.json"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KEYSCOPE_CACHE": str(tmp_path / "cache"),
           "CUDA_VISIBLE_DEVICES": ""}
    began = time.time()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver), mode, str(tmp_path), "covariance", "--layer", "0", "--cov-tokens", "2000", "--batch-size", "2",
                           "--no-progress", "--json", str(report)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ends = {rank: (tmp_path / f"rank{rank}").read_text().split() for rank in (0, 1)}  # both ended by themselves
    assert {rank: int(code) for rank, (code, _) in ends.items()} == {0: status, 1: status}, done.stderr[-3000:]
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("keyscope: error:")]
    assert f"keyscope: error: {message}" in errors
    assert "keyscope: error: rank 0 of 2: stopped because rank 1 of 2 failed (see its error)" in errors
    assert len(errors) == 2
    # a bug shows its traceback, as in a single process; a KeyscopeError is its one line
    assert ('raise RuntimeError("out of memory in this shard")' in done.stderr) == (mode == "shard")
    assert "raise EmptyCorpus" not in done.stderr
    assert max(float(end) for _, end in ends.values()) - began < 120  # torch import and the pass included
    assert not report.exists() and not report.parent.exists()  # rank 0's --json (and its new folder) removed
