from __future__ import annotations

import csv
import json

import pytest
import torch

from keyscope.cli import main
from keyscope.model import models


@pytest.mark.slow
def test_sequential_writes_checkpoints_figure_csv_and_leaves_the_weights_bit_exact(tmp_path, monkeypatch, capsys):
    model = models.load_model()
    snapshot = {n: p.detach().clone() for n, p in model.original_model.named_parameters()}
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: model)  # the command edits this very object
    out, report = tmp_path / "out", tmp_path / "seq.json"
    assert main(["sequential", "--methods", "rome", "--n", "3", "--checkpoints", "1,3", "--out", str(out),
                 "--json", str(report), "--no-progress"]) == 0
    assert all(torch.equal(p.detach(), snapshot[n]) for n, p in model.original_model.named_parameters())
    payload = json.loads(report.read_text())
    assert [e["n_edits"] for e in payload["checkpoints"]] == [1, 3] and payload["weights_restored"] is True
    assert "rep_config" not in payload and payload["rome_config"]["v_num_grad_steps"] > 0  # only what ROME used
    assert all({"retention", "locality", "rephrase_id", "long_ood"} <= set(e) for e in payload["checkpoints"])
    assert (out / "fig_sequential.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "sequential.csv")))
    assert [(r["method"], r["n_edits"]) for r in rows] == [("rome", "1"), ("rome", "3")]
    assert "weights restored bit-exactly: True" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nope"], "unknown method"),
    (["--checkpoints", "a,b"], "--checkpoints"),
    (["--n", "5", "--checkpoints", "10"], "checkpoints must lie in 1..5"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main(["sequential", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keyscope: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
