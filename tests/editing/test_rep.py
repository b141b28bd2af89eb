from __future__ import annotations

import dataclasses

import pytest
import torch

from keyscope._infra.errors import InvalidKeys, KeyscopeError, NotFitted
from keyscope.analysis.covariance import KeyCovariance
from keyscope.analysis.keys import collect_keys
from keyscope.data.perturbations import Probe
from keyscope.editing import rep, rome
from keyscope.editing.optimise import EditTrace
from keyscope.editing.request import EditRequest
from keyscope.model.models import W_out, load_model
from tests import hf_tiny

D = 64
LAYER = 1


def _synthetic_edit(seed: int = 0) -> rome.RankOneEdit:
    """A RankOneEdit whose key_selector is C⁻¹k*/(k*ᵀC⁻¹k*) for a random SPD C, on random tensors."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    C = A @ A.T / D + 0.1 * torch.eye(D, dtype=torch.float64)
    k_star = torch.randn(D, generator=g)
    C_inv_k = torch.linalg.solve(C, k_star.double())
    selector = (C_inv_k / (k_star.double() @ C_inv_k)).float()
    trace = EditTrace((0.0,), (0.0,), (0.0,), (0.0,), (1.0,), 1.0, 4.0, 1.0, False)
    request = EditRequest("{} plays", "Someone", "piano")
    return rome.RankOneEdit(request, LAYER, k_star, torch.zeros(8), torch.ones(8), selector, ("",), rome.ROMEConfig(), trace)


def _keys(edit: rome.RankOneEdit, n: int, alpha: float, seed: int) -> torch.Tensor:
    """``n`` random keys with edit strength exactly ``alpha``."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, D, generator=g)
    s = edit.key_selector
    keys = keys - (keys @ s)[:, None] * s / (s @ s)  # strength 0
    return keys + alpha * edit.k_star  # strength alpha (k*ᵀ selector = 1)


def test_untrained_adaptor_is_the_identity_and_has_the_paper_shape():
    adaptor = rep.KeyAdaptor(D, rank=32, gate_hidden_fraction=0.1)
    keys = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(0))  # (batch, pos, d_mlp)
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


def _cluster(edit: rome.RankOneEdit, n: int, alpha: float, spread: float, seed: int) -> torch.Tensor:
    """``n`` keys of one subject: a common centre plus noise of relative size ``spread``, all of edit
    strength exactly ``alpha``."""
    centre = _keys(edit, 1, alpha, seed)  # (1, D)
    noise = _keys(edit, n, 0.0, seed + 1000)  # (n, D), strength 0
    return centre + spread * noise * centre.norm() / noise.norm(dim=1, keepdim=True)  # (n, D)


def test_fit_pulls_positives_to_the_edit_and_keeps_the_gate_off_on_negatives():
    edit = _synthetic_edit()
    positives = _cluster(edit, 12, 0.2, spread=0.3, seed=1)  # one cluster: forms of the same subject
    centre = positives.mean(0)
    assert ((positives - centre).norm(dim=1) < 0.5 * centre.norm()).all()  # a cluster, not 12 random keys
    anchors = torch.stack([edit.k_star, edit.k_star * 1.01])
    negatives = _keys(edit, 64, 0.1, seed=2) - 2.0 * edit.k_star.roll(7)
    fitted = rep.REP(rep.REPConfig(steps=300)).fit(edit, rep.REPKeys(positives, anchors, negatives))
    before = edit.strength(positives)
    after = fitted.strength(positives)
    assert torch.allclose(before, torch.full_like(before, 0.2), atol=1e-4)  # the edit misses them before
    assert (after - 1.0).abs().max() < 0.25, after  # 0.19 with the default (released) anchor and mini-batches
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
    request = EditRequest("The actress {}", "Danielle Darrieux", "Paris")
    config = rome.ROMEConfig.for_model(model, v_num_grad_steps=3)
    edit = rome.compute_edit(model, request, LAYER, cov, config, prefixes=("", "The"))
    return model, cov, edit


def test_gather_keys_collects_positives_anchors_and_ranked_negatives(tiny):
    model, _, edit = tiny
    probes = [Probe("The actress {}", "Darrieux", "rephrase"), Probe("{} was born in", "Danielle Darrieux", "template"),
              Probe("Paris is big. The actress {}", "Danielle Darrieux", "long")]
    others = collect_keys(model, ["{} is located in"] * 3, ["The Eiffel Tower", "Michael Jordan", "Slovenia"], LAYER)
    config = rep.REPConfig(n_similar_negatives=1, n_random_negatives=1, n_context_negatives=2, anchor="prefixes")
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
    with rep.REPEdit(rome.ROMEEdits([edit]), {(0, LAYER): fitted}).applied(model):
        adapted = collect_keys(model, ["The actress {}"], ["Darrieux"], LAYER)
        assert not torch.equal(W_out(model, LAYER), W_before)
    assert torch.allclose(adapted[0], fitted.transform(keys.positives)[0], atol=1e-5)
    assert not torch.allclose(adapted, keys.positives)
    assert torch.equal(W_out(model, LAYER), W_before)
    with pytest.raises(RuntimeError, match="boom"), rep.REPEdit(rome.ROMEEdits([edit]), {(0, LAYER): fitted}).applied(model):
        raise RuntimeError("boom")
    assert torch.equal(W_out(model, LAYER), W_before)
    with torch.no_grad():
        assert torch.equal(model(ids), logits_before)  # no hook left behind
    assert torch.equal(collect_keys(model, ["The actress {}"], ["Darrieux"], LAYER), keys.positives)


# ---------------------------------------------------------------------------------------------- released setting


def test_released_setting_has_each_of_the_released_codes_choices():
    released = rep.REPConfig.released()
    expected = dict(rank=32, gate_hidden_fraction=0.1, dropout=0.1, tau=0.9, lr=5e-4, steps=10, batch_size=15,
                    objective="released", anchor="bare", anchor_loss="mse", anchor_weight=50000.0,
                    gate_negatives=False, train_long_context=False, dropout_at_inference=True, bias=False,
                    gate_strict=True, input_scaling=False, positive_kinds=("rephrase", "shuffle"),
                    positive_prefixes=True)
    assert {name: getattr(released, name) for name in expected} == expected
    default = rep.REPConfig()
    kept = ("rank", "gate_hidden_fraction", "dropout", "tau",  # shared; then the released choices the default adopted
            "batch_size", "anchor", "anchor_loss", "anchor_weight", "bias", "gate_strict", "input_scaling")
    assert all(getattr(default, name) != value for name, value in expected.items() if name not in kept)
    assert all(getattr(default, name) == expected[name] for name in kept)
    assert rep.REPConfig.named("released", tau=0.5) == rep.REPConfig.released(tau=0.5)
    assert rep.REPConfig.named("keyscope") == default and rep.REPConfig.named("paper") == rep.REPConfig.paper()
    with pytest.raises(ValueError, match="released"):
        rep.REPConfig.named("original")
    for bad in (dict(anchor="all"), dict(anchor_loss="l1"), dict(batch_size=0), dict(positive_kinds=("alias",))):
        with pytest.raises(ValueError):
            rep.REPConfig(**bad)
    adaptor = rep.KeyAdaptor(D)  # REPConfig()'s adaptor: no biases, g > τ
    assert adaptor.down.bias is None and adaptor.up.bias is None and adaptor.up.weight.abs().sum() == 0
    at_tau = torch.tensor([0.9, 0.95])
    assert adaptor.gate_on(at_tau, 0.9).tolist() == [False, True]
    loose = rep.KeyAdaptor(D, bias=True, gate_strict=False)
    assert loose.down.bias is not None and loose.up.bias is not None
    assert loose.gate_on(at_tau, 0.9).tolist() == [True, True]


def test_minibatches_follow_the_released_sampler():
    g = torch.Generator().manual_seed(3)
    first = torch.randperm(21, generator=g)
    second = first[torch.randperm(21, generator=g)]
    third = second[torch.randperm(21, generator=g)]
    expected = [first[:15], second[:15], second[:15], third[:15]]  # after a reshuffle the position is back at 0
    assert all(torch.equal(a, b) for a, b in zip(rep.minibatches(21, 15, 4, seed=3), expected, strict=True))
    assert [len(b) for b in rep.minibatches(5, 15, 2)] == [5, 5]  # fewer rows than a batch: all, reshuffled


def _released_probes() -> list[Probe]:
    rephrases = ["D. Darrieux", "Mlle Darrieux", "Danielle D.", "the actress Darrieux", "Darrieux"]
    shuffles = ["Darrieux Danielle", "Dar Danielle rieux", "rieux Danielle Dar", "Danielle rieuxDar"]
    return [*(Probe("The actress {}", s, "rephrase") for s in rephrases),
            *(Probe("The actress {}", s, "shuffle") for s in shuffles),
            Probe("The actress {}", "Darrieux Danielle", "shuffle_words"),
            Probe("{} was born in", "Danielle Darrieux", "template"),
            Probe("Paris is big. The actress {}", "Danielle Darrieux", "long")]


def test_released_gather_keys_puts_every_subject_behind_every_prefix_and_anchors_the_bare_prompt(tiny):
    model, _, edit = tiny
    assert edit.prefixes == ("", "The")
    keys = rep.gather_keys(model, edit, _released_probes(), rep.REPConfig.released())
    expected = [("The. The actress {}", "Danielle Darrieux")]  # the original, behind the non-bare prefix
    for probe in _released_probes()[:9]:  # rephrases and token shuffles only
        expected += [(probe.template, probe.subject), (f"The. {probe.template}", probe.subject)]
    reference = collect_keys(model, [t for t, _ in expected], [s for _, s in expected], LAYER)
    assert keys.positives.shape == (1 + 2 * 9, model.cfg.d_mlp)
    assert torch.allclose(keys.positives, reference, atol=1e-5)
    assert keys.anchors.shape == (1, model.cfg.d_mlp) and torch.equal(keys.anchors[0], edit.prefix_keys[0])
    assert keys.negatives.shape[0] == 0


def test_released_training_steps_match_a_transcription_of_the_released_objective(tiny):
    """Each training step of ``REPConfig.released()`` against aggregator.py's loss and torch's Adam, written
    out densely: ``−mean (k̂/‖k̂‖)ᵀu + 50000 · mean (k̂_a − k_a)²`` on a mini-batch of 15."""
    model, _, edit = tiny
    keys = rep.gather_keys(model, edit, _released_probes(), rep.REPConfig.released())
    signs = torch.tensor([(-1.0) ** (i % 3 == 0) for i in range(len(keys.positives))])  # (19,)
    keys = rep.REPKeys(keys.positives * signs[:, None], keys.anchors, keys.negatives)  # some kᵀu < 0: no |·|
    pos, anchor = keys.positives, keys.anchors  # (19, d), (1, d)
    n, d = pos.shape
    assert n > 15
    steps, lr, beta1, beta2, eps, p_drop = 3, 5e-4, 0.9, 0.999, 1e-8, 0.1
    u = edit.key_selector / edit.key_selector.norm()  # ROME's left vector C⁻¹k*/‖C⁻¹k*‖
    init = rep.KeyAdaptor(d, 32, 0.1, p_drop, seed=0, bias=False)
    params = {"A": init.down.weight, "B": init.up.weight, "W1": init.gate[0].weight, "b1": init.gate[0].bias,
              "W2": init.gate[2].weight, "b2": init.gate[2].bias}
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    # the sampler: a random order, consecutive batches, a reshuffle (and back to 0) when the next one overruns
    g_batch, g_drop = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    order, index = torch.randperm(n, generator=g_batch), 0

    def adapt(x, p):
        keep = (torch.rand(x.shape, generator=g_drop) >= p_drop).float()
        shift = ((x * keep / (1 - p_drop)) @ p["A"].T) @ p["B"].T  # no bias, no input scaling
        gate = torch.sigmoid(torch.nn.functional.gelu(x @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"])  # (n, 1)
        return x + gate * shift

    losses, after = [], []
    for t in range(1, steps + 1):
        if index + 15 > n:
            order, index = order[torch.randperm(n, generator=g_batch)], 0
            rows = order[:15]
        else:
            rows, index = order[index : index + 15], index + 15
        k_hat = adapt(pos[rows], params)
        agg = -((k_hat / k_hat.norm(dim=-1, keepdim=True)) @ u).mean()
        consistency = ((adapt(anchor, params) - anchor) ** 2).mean()
        loss = agg + 50000.0 * consistency
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for (name, p), grad in zip(params.items(), grads):
                m[name] = beta1 * m[name] + (1 - beta1) * grad
                v[name] = beta2 * v[name] + (1 - beta2) * grad**2
                p -= lr * (m[name] / (1 - beta1**t)) / ((v[name] / (1 - beta2**t)).sqrt() + eps)
        losses.append(float(loss.detach()))
        after.append({k: p.detach().clone() for k, p in params.items()})

    fitted = rep.REP(rep.REPConfig.released(steps=steps)).fit(edit, keys)
    assert [h["loss"] for h in fitted.history_] == pytest.approx(losses, rel=1e-5, abs=1e-7)
    assert fitted.history_[0]["anchor"] == 0.0 and fitted.history_[1]["anchor"] > 0.0  # P = 0 only at the start
    one = rep.REP(rep.REPConfig.released(steps=1)).fit(edit, keys).adaptor_
    for adaptor, expected in ((one, after[0]), (fitted.adaptor_, after[-1])):
        ours = {"A": adaptor.down.weight, "B": adaptor.up.weight, "W1": adaptor.gate[0].weight,
                "b1": adaptor.gate[0].bias, "W2": adaptor.gate[2].weight, "b2": adaptor.gate[2].bias}
        for name, value in expected.items():
            assert torch.allclose(ours[name], value, rtol=1e-4, atol=1e-7), name
    assert (after[-1]["W1"] - init.gate[0].weight).abs().max() > 0  # the gate and A trained too
    assert (after[-1]["A"] - init.down.weight).abs().max() > 0


@pytest.mark.parametrize("make, message", [
    (lambda e: [e.k_star[None]], "not a list"),
    (lambda e: rep.REPKeys(torch.zeros(3, D + 1), e.k_star[None], torch.zeros(0, D)), r"positives has shape \(3, 65\)"),
    (lambda e: rep.REPKeys(torch.zeros(3, D), e.k_star, torch.zeros(0, D)), r"anchors has shape \(64,\)"),
    (lambda e: rep.REPKeys(torch.zeros(0, D), torch.zeros(0, D), torch.zeros(0, D)), "anchors is empty"),
    (lambda e: rep.REPKeys(torch.full((2, D), float("nan")), e.k_star[None], torch.zeros(0, D)), "NaN"),
    (lambda e: rep.REPKeys(torch.zeros(2, D), e.k_star[None], [e.k_star]), "negatives must be a tensor"),
], ids=["list", "width", "1-d", "empty", "nan", "negatives"])
def test_fit_refuses_bad_keys_with_a_keyscope_error(make, message):
    edit = _synthetic_edit()
    with pytest.raises(InvalidKeys, match=message) as exc:
        rep.REP(rep.REPConfig(steps=2)).fit(edit, make(edit))
    assert isinstance(exc.value, KeyscopeError) and "\n" not in str(exc.value)
    empty_positives = rep.REPKeys(torch.zeros(0, D), edit.k_star[None], torch.zeros(0, D))  # allowed: keeps anchors
    fitted = rep.REP(rep.REPConfig(steps=2)).fit(edit, empty_positives)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in fitted.history_)


def test_an_unfitted_adaptor_is_refused_before_anything_changes(tiny):
    model, _, edit = tiny
    W_before = W_out(model, LAYER).clone()
    with pytest.raises(NotFitted, match="not fitted"), rep.REPEdit(rome.ROMEEdits([edit]), {(0, LAYER): rep.REP()}).applied(model):
        pass
    with pytest.raises(NotFitted, match="not fitted"), rep.adapted(model, rep.REP()):
        pass
    with pytest.raises(NotFitted):
        rep.REP().transform(edit.k_star[None])
    assert torch.equal(W_out(model, LAYER), W_before) and isinstance(NotFitted("x"), KeyscopeError)


# ---------------------------------------------------------------------------------------------- gate recording


def forced_adaptor(model, layer: int, bias: float, tau: float = 0.9, seed: int = 0) -> rep.REP:
    """A fitted-looking REP at ``layer`` without training: an untrained adaptor (random gate, random ``up`` so that
    it moves the keys where on) whose gate's last bias is shifted by ``bias`` (±50 forces it on / off everywhere)."""
    fitted = rep.REP(rep.REPConfig(tau=tau))
    fitted.adaptor_ = rep.KeyAdaptor(int(model.cfg.d_mlp), seed=seed).eval()  # as fit leaves it: no dropout
    with torch.no_grad():
        fitted.adaptor_.gate[-1].bias += bias
        fitted.adaptor_.up.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    fitted.layer_, fitted.history_, fitted.edit_ = layer, [], None
    return fitted


def _batch(model, texts):
    from keyscope.data.prompts import pad_batch

    return pad_batch([model.tokenizer(t)["input_ids"] for t in texts], 0, "right")  # (batch, pos) ids and mask


def test_recorded_gates_count_forced_and_partial_gates_and_change_nothing(tiny):
    from keyscope.analysis.keys import layer_keys

    model, _, _ = tiny
    ids, mask = _batch(model, ["The actress Danielle Darrieux", "Paris", "The Eiffel Tower is located in"])
    probe = forced_adaptor(model, LAYER, 0.0, seed=3)
    with torch.no_grad():
        gate = probe.adaptor_.gate_probability(layer_keys(model, ids, mask, LAYER).float())  # (batch, pos) unedited
    tau = float(gate[mask.bool()].median())  # on at about half the real positions
    partial = forced_adaptor(model, LAYER, 0.0, tau=tau, seed=3)
    on, off = forced_adaptor(model, LAYER + 1, 50.0), forced_adaptor(model, LAYER + 1, -50.0, seed=1)
    with torch.no_grad(), rep.adapted(model, partial), rep.adapted(model, on), rep.adapted(model, off):
        plain = model(ids, attention_mask=mask)
        with rep.recorded_gates([partial, on, off]) as calls:
            recorded = model(ids, attention_mask=mask)
    assert torch.equal(recorded, plain)  # recording changes nothing of the forward pass
    assert [len(c) for c in calls] == [1, 1, 1] and calls[0][0].shape == ids.shape
    assert torch.equal(calls[0][0], gate > tau)  # the first adaptor of LAYER sees the unedited keys
    assert 0 < int((calls[0][0] & mask.bool()).sum()) < int(mask.sum())
    assert bool(calls[1][0].all()) and not bool(calls[2][0].any())
    with rep.recorded_gates([on]) as soft:
        on.adaptor_(torch.zeros(2, int(model.cfg.d_mlp)), None)  # the soft gate (training) has no on-set
    assert soft == [[]]
    with pytest.raises(NotFitted), rep.recorded_gates([on, rep.REP(on.config)]):
        pass
    assert not on.adaptor_._forward_pre_hooks  # refused before any hook was registered
    twin = on.with_tau(0.5)  # shares the adaptor: its calls could not be told apart
    with pytest.raises(ValueError, match="twice"), rep.recorded_gates([on, twin]):
        pass


def test_recorded_gates_remove_their_hooks_on_an_exception(tiny):
    model, _, _ = tiny
    on = forced_adaptor(model, LAYER, 50.0)
    ids, mask = _batch(model, ["The actress Danielle Darrieux"])
    with pytest.raises(RuntimeError, match="boom"), rep.recorded_gates([on]) as calls:
        raise RuntimeError("boom")
    assert not on.adaptor_._forward_pre_hooks
    with torch.no_grad(), rep.adapted(model, on):
        model(ids, attention_mask=mask)
    assert calls == [[]]  # nothing recorded after the block
