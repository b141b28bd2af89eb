from __future__ import annotations

import dataclasses

import pytest
import torch

from keyscope import rep, rome
from keyscope.covariance import KeyCovariance
from keyscope.keys import collect_keys
from keyscope.models import W_out, load_model
from keyscope.perturbations import Probe
from tests import hf_tiny

D = 64
LAYER = 1


def _synthetic_edit(seed: int = 0) -> rome.Edit:
    """An Edit whose key_selector is C⁻¹k*/(k*ᵀC⁻¹k*) for a random SPD C, on random tensors."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    C = A @ A.T / D + 0.1 * torch.eye(D, dtype=torch.float64)
    k_star = torch.randn(D, generator=g)
    C_inv_k = torch.linalg.solve(C, k_star.double())
    selector = (C_inv_k / (k_star.double() @ C_inv_k)).float()
    trace = rome.EditTrace((0.0,), (0.0,), (0.0,), (0.0,), (1.0,), 1.0, 4.0, 1.0, False)
    request = rome.EditRequest("{} plays", "Someone", "piano")
    return rome.Edit(request, LAYER, k_star, torch.zeros(8), torch.ones(8), selector, ("",), rome.ROMEConfig(), trace)


def _keys(edit: rome.Edit, n: int, alpha: float, seed: int) -> torch.Tensor:
    """``n`` random keys with edit strength exactly ``alpha``."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, D, generator=g)
    s = edit.key_selector
    keys = keys - (keys @ s)[:, None] * s / (s @ s)  # strength 0
    return keys + alpha * edit.k_star  # strength alpha (k*ᵀ selector = 1)


def test_untrained_adaptor_is_the_identity_and_has_the_paper_shape():
    adaptor = rep.KeyAdaptor(D, rank=32, gate_hidden_fraction=0.1)
    keys = torch.randn(5, 3, D)  # (batch, pos, d_mlp)
    assert torch.equal(adaptor(keys), keys) and torch.equal(adaptor(keys, tau=0.0001), keys)
    assert adaptor.gate[0].out_features == int(0.1 * D) and adaptor.down.out_features == 32
    assert adaptor.up.weight.abs().sum() == 0


def test_paper_setting_reproduces_the_released_code():
    paper = rep.REPConfig.paper()
    assert (paper.lr, paper.steps, paper.objective) == (5e-4, 10, "paper")
    assert not paper.gate_negatives and not paper.train_long_context and paper.dropout_at_inference
    default = rep.REPConfig()
    assert default.gate_negatives and default.train_long_context and not default.dropout_at_inference
    assert default.tau == 0.9
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.tau = 0.5  # type: ignore[misc]
    with pytest.raises(ValueError):
        rep.REPConfig(objective="cosine")


def test_fit_pulls_positives_to_the_edit_and_keeps_the_gate_off_on_negatives():
    edit = _synthetic_edit()
    positives = _keys(edit, 12, 0.2, seed=1) + 3.0 * edit.k_star  # one cluster: same subject
    positives = positives - 3.0 * edit.k_star
    anchors = torch.stack([edit.k_star, edit.k_star * 1.01])
    negatives = _keys(edit, 64, 0.1, seed=2) - 2.0 * edit.k_star.roll(7)
    fitted = rep.REP(rep.REPConfig(steps=300)).fit(edit, rep.REPKeys(positives, anchors, negatives))
    before = edit.strength(positives)
    after = fitted.strength(positives)
    assert before.abs().max() < 0.25
    assert (after - 1.0).abs().max() < 0.15, after
    assert (fitted.gate(positives) >= 0.9).all() and (fitted.gate(negatives) < 0.9).all()
    assert torch.equal(fitted.transform(negatives), negatives)  # the branch is off: keys untouched exactly
    assert torch.allclose(fitted.transform(anchors), anchors, rtol=0.05, atol=0.05 * anchors.norm() / D**0.5)
    assert fitted.history_[-1]["loss"] < fitted.history_[0]["loss"]


def test_fit_is_deterministic_and_tau_can_change_without_refitting():
    edit = _synthetic_edit()
    data = rep.REPKeys(_keys(edit, 8, 0.3, 1), edit.k_star[None], _keys(edit, 16, 0.0, 2))
    a = rep.REP(rep.REPConfig(steps=20)).fit(edit, data)
    b = rep.REP(rep.REPConfig(steps=20)).fit(edit, data)
    for (name, p), q in zip(a.adaptor_.named_parameters(), b.adaptor_.parameters()):
        assert torch.equal(p, q), name
    low = a.with_tau(0.01)
    assert low.adaptor_ is a.adaptor_ and low.config.tau == 0.01
    assert torch.equal(low.transform(data.positives), a.transform(data.positives, tau=0.01))


def test_paper_objective_trains_without_negatives():
    edit = _synthetic_edit()
    data = rep.REPKeys(_keys(edit, 8, 0.3, 1), edit.k_star[None], torch.zeros((0, D)))
    fitted = rep.REP(rep.REPConfig.paper(steps=50, lr=5e-3)).fit(edit, data)
    assert "gate" not in fitted.history_[0]
    assert fitted.history_[-1]["objective"] < fitted.history_[0]["objective"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama"]))
    cov = KeyCovariance(LAYER, n_tokens=2000, seq_len=64, progress=False).fit(model, hf_tiny.TRAINING_TEXT * 10)
    request = rome.EditRequest("The actress {}", "Danielle Darrieux", "Paris")
    config = rome.ROMEConfig.for_model(model, v_num_grad_steps=3)
    edit = rome.compute_edit(model, request, LAYER, cov, config, prefixes=("", "The"))
    return model, cov, edit


def test_gather_keys_collects_positives_anchors_and_ranked_negatives(tiny):
    model, _, edit = tiny
    probes = [Probe("The actress {}", "Darrieux", "rephrase"), Probe("{} was born in", "Danielle Darrieux", "template"),
              Probe("Paris is big. The actress {}", "Danielle Darrieux", "long")]
    others = collect_keys(model, ["{} is located in"] * 3, ["The Eiffel Tower", "Michael Jordan", "Slovenia"], LAYER)
    config = rep.REPConfig(n_similar_negatives=1, n_random_negatives=1, n_context_negatives=2)
    keys = rep.gather_keys(model, edit, probes, config, subject_keys=others)
    assert keys.positives.shape == (3, model.cfg.d_mlp) and keys.anchors.shape == (2, model.cfg.d_mlp)
    strongest = others[edit.strength(others).argmax()]
    assert any(torch.equal(strongest, row) for row in keys.negatives)
    assert keys.negatives.shape[0] == 2 + 2 * 4  # 2 subjects + 2 context positions of 4 prompts
    paper = rep.gather_keys(model, edit, probes, rep.REPConfig.paper(), subject_keys=others)
    assert paper.positives.shape[0] == 2 and paper.negatives.shape[0] == 0  # no long context, no negatives


def test_applied_adapts_keys_inside_and_restores_everything_on_exit(tiny):
    model, _, edit = tiny
    keys = rep.REPKeys(collect_keys(model, ["The actress {}"], ["Darrieux"], LAYER), edit.k_star[None],
                       collect_keys(model, ["{} is located in"], ["Slovenia"], LAYER))
    fitted = rep.REP(rep.REPConfig(steps=200)).fit(edit, keys)
    W_before = W_out(model, LAYER).clone()
    ids = torch.tensor([model.tokenizer("The actress Darrieux")["input_ids"]])
    with torch.no_grad():
        logits_before = model(ids)
    with rep.applied(model, edit, fitted):
        adapted = collect_keys(model, ["The actress {}"], ["Darrieux"], LAYER)
        assert not torch.equal(W_out(model, LAYER), W_before)
    assert torch.allclose(adapted[0], fitted.transform(keys.positives)[0], atol=1e-5)
    assert not torch.allclose(adapted, keys.positives)
    assert torch.equal(W_out(model, LAYER), W_before)
    with pytest.raises(RuntimeError, match="boom"), rep.applied(model, edit, fitted):
        raise RuntimeError("boom")
    assert torch.equal(W_out(model, LAYER), W_before)
    with torch.no_grad():
        assert torch.equal(model(ids), logits_before)  # no hook left behind
    assert torch.equal(collect_keys(model, ["The actress {}"], ["Darrieux"], LAYER), keys.positives)
