from __future__ import annotations

import pytest
import torch

from keyscope._infra.errors import KeyscopeError
from keyscope.analysis.covariance import load_or_compute_covariance
from keyscope.data import corpus as corpora
from keyscope.data.datasets import load_facts
from keyscope.editing.rome import ROMEConfig
from keyscope.evaluation import sequential as seq
from keyscope.model.models import default_layer, load_model


@pytest.fixture(scope="module")
def factworld():
    model = load_model()
    layer = default_layer(model)
    cov = load_or_compute_covariance(model, layer, progress=False)
    return model, load_facts("factworld"), layer, cov


def _params(model):
    return {n: p.detach().clone() for n, p in model.original_model.named_parameters()}


def _same(model, snapshot) -> bool:
    return all(torch.equal(p.detach(), snapshot[n]) for n, p in model.original_model.named_parameters())


def test_config_checks_checkpoints():
    assert seq.SequentialConfig(n=5, checkpoints=(5, 2, 2)).checkpoints == (2, 5)
    with pytest.raises(KeyscopeError, match="checkpoints"):
        seq.SequentialConfig(n=5, checkpoints=(10,))
    with pytest.raises(KeyscopeError, match="at least 1"):
        seq.SequentialConfig(n=0, checkpoints=(1,))


@pytest.mark.slow
def test_sequential_rome_measures_each_checkpoint_and_restores_every_weight(factworld):
    model, facts, layer, cov = factworld
    snapshot = _params(model)
    config = seq.SequentialConfig(n=3, checkpoints=(1, 3), seed=1)
    result = seq.run_sequential(model, facts, layer, cov, corpora.documents(corpora.default_corpus(model)), ["rome"],
                                config, rome_config=ROMEConfig.for_model(model, v_num_grad_steps=30), progress=False)
    assert _same(model, snapshot) and result.weights_restored
    entries = result.as_json()["checkpoints"]
    assert [e["n_edits"] for e in entries] == [1, 3]
    for e in entries:
        assert 0.0 <= e["retention"] <= 1.0 and 0.0 <= e["locality"] <= 1.0 and e["gate_other"] is None
        assert {"rephrase_id", "shuffle_ood", "long_id"} <= set(e)
    assert entries[0]["retention"] == 1.0  # a single fresh ROME edit of a known factworld fact holds


@pytest.mark.slow
def test_an_error_mid_run_still_undoes_every_edit(factworld, monkeypatch):
    model, facts, layer, cov = factworld
    snapshot = _params(model)
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return {"retention": 1.0}

    monkeypatch.setattr(seq, "_measure", failing)
    with pytest.raises(RuntimeError, match="boom"):
        seq.run_sequential(model, facts, layer, cov, corpora.documents(corpora.default_corpus(model)), ["rome"],
                           seq.SequentialConfig(n=2, checkpoints=(1, 2)),
                           rome_config=ROMEConfig.for_model(model, v_num_grad_steps=5), progress=False)
    assert len(calls) == 2 and _same(model, snapshot)
