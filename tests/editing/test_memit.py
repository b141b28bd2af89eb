from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from keyscope._infra.errors import KeyscopeError
from keyscope.analysis.covariance import KeyCovariance
from keyscope.analysis.keys import collect_keys
from keyscope.data.perturbations import Probe
from keyscope.data.prompts import locate, pad_batch
from keyscope.editing import memit, rome
from keyscope.editing.base import EDITORS, prepare_context
from keyscope.editing.prefixes import prefixed
from keyscope.editing.request import EditRequest
from keyscope.model.models import W_out, load_model
from tests import hf_tiny

LAYERS = (0, 1)
REQUESTS = [EditRequest("The actress {}", "Danielle Darrieux", "Paris"),
            EditRequest("{} played basketball for the", "Michael Jordan", "Lakers"),
            EditRequest("The capital of {} is", "Slovenia", "Rome")]
PREFIXES = ("", "The tower", "In the city")


def _random_cov(d: int, n_tokens: int = 400, seed: int = 0) -> KeyCovariance:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_tokens, d, generator=generator) * torch.linspace(0.2, 2.0, d)  # (n_tokens, d)
    return KeyCovariance(0, progress=False).partial_fit(keys)


def _dense(keys: torch.Tensor, cov: KeyCovariance, lam: float) -> torch.Tensor:
    """MEMIT's ``adj_k = solve(λ C + K Kᵀ, K)`` (memit_main.py), dense, float64, with keyscope's ridged C."""
    cov.cholesky()
    C = cov.C_ + cov.ridge_ * torch.eye(cov.C_.shape[0], dtype=torch.float64)  # (d, d)
    K = keys.double().T  # (d, n)
    return torch.linalg.solve(lam * C + K @ K.T, K).T  # (n, d)


# ---------------------------------------------------------------------------------------------- the update


@pytest.mark.parametrize("lam", [15000.0, 10.0, 0.5])
def test_update_equals_the_dense_closed_form(lam):
    d, n = 24, 4
    cov = _random_cov(d)
    keys = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    A = memit.memit_update(keys, cov, lam)
    assert torch.allclose(A, _dense(keys, cov, lam), rtol=1e-8, atol=1e-12)
    R = torch.randn(n, 5, dtype=torch.float64)  # (n, d_model)
    delta_W = R.T @ A  # (d_model, d)
    dense_W = R.T @ torch.linalg.solve(lam * (cov.C_ + cov.ridge_ * torch.eye(d, dtype=torch.float64))
                                       + keys.double().T @ keys.double(), keys.double().T).T
    assert torch.allclose(delta_W, dense_W, rtol=1e-8, atol=1e-12)


def test_at_lambda_zero_every_key_receives_exactly_its_residual():
    d, n = 24, 3
    cov = _random_cov(d)
    keys = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    A = memit.memit_update(keys, cov, 0.0)  # (n, d)
    R = torch.randn(n, 7, dtype=torch.float64)
    assert torch.allclose((R.T @ A) @ keys.double().T, R.T, atol=1e-9)  # ΔW K = R: W' k_i = W k_i + r_i


def test_one_request_is_rome_like_and_its_strength_is_romes():
    d = 24
    cov = _random_cov(d)
    k_star = torch.randn(1, d, generator=torch.Generator().manual_seed(3))
    A = memit.memit_update(k_star, cov, 0.0)[0]
    C_inv_k = cov.solve(k_star[0])
    assert torch.allclose(A, C_inv_k / (k_star[0].double() @ C_inv_k), atol=1e-10)  # ROME's C⁻¹k*/k*ᵀC⁻¹k*
    lam = 50.0
    update = memit.LayerUpdate(0, torch.ones(1, 4), memit.memit_update(k_star, cov, lam).float(), k_star,
                               k_star[:, None])
    edit = memit.MEMITEdit([REQUESTS[0]], [update], torch.zeros(1, 4), ("",), memit.MEMITConfig(layers=(0,)))
    others = torch.randn(6, d, generator=torch.Generator().manual_seed(4))
    rome_strength = (others.double() @ C_inv_k) / (k_star[0].double() @ C_inv_k)
    assert torch.allclose(edit.strength(others).double(), rome_strength, atol=1e-5)
    assert float(edit.strength(k_star[0])) == pytest.approx(1.0, abs=1e-6)
    g = float(k_star[0].double() @ C_inv_k)
    assert float(update.own()[0]) == pytest.approx(g / (lam + g), rel=1e-5)  # λ > 0 installs a share g / (λ + g)


# ---------------------------------------------------------------------------------------------- config


class _Stub:
    """A stand-in for a loaded model: its config and HF model type, with its source recorded beside it."""

    def __init__(self, model_type: str, n_layers: int):
        self.cfg = SimpleNamespace(n_layers=n_layers)
        self.original_model = SimpleNamespace(config=SimpleNamespace(model_type=model_type))


def _stub(model_type, n_layers=48, card=None):
    from keyscope.model.models import ModelSource, register_source

    model = _Stub(model_type, n_layers)
    register_source(model, ModelSource("x", card=card or {}))
    return model


def test_published_settings_per_family_and_the_factworld_card():
    assert memit.MEMITConfig() == memit.MEMITConfig(**{**memit.PUBLISHED["gpt2"]})
    gptj = memit.PUBLISHED["gptj"]
    assert (gptj["layers"], gptj["mom2_update_weight"], gptj["v_num_grad_steps"]) == ((3, 4, 5, 6, 7, 8), 15000.0, 25)
    llama = memit.PUBLISHED["llama"]
    assert (llama["layers"], llama["clamp_norm_factor"], llama["v_weight_decay"]) == ((4, 5, 6, 7, 8), 4.0, 1e-3)
    factworld = load_model()
    config = memit.MEMITConfig.for_model(factworld)
    card = factworld_card()
    assert config.layers == tuple(card["layers"]) and config.v_num_grad_steps == card["v_num_grad_steps"]
    assert config.mom2_update_weight == card["mom2_update_weight"] and config.clamp_norm_factor == 4.0  # LLaMA's
    assert memit.MEMITConfig.for_model(factworld, layers=(2, 3)).layers == (2, 3)
    with pytest.raises(KeyscopeError, match="do not exist"):
        memit.MEMITConfig.for_model(factworld, layers=(5, 6))
    with pytest.raises(ValueError, match="increasing"):
        memit.MEMITConfig(layers=(2, 1))
    assert memit.MEMITConfig(v_num_grad_steps=7).z_config().v_num_grad_steps == 7


def factworld_card():
    import json

    from keyscope.factworld import shipped_model_dir

    return json.loads((shipped_model_dir() / "keyscope.json").read_text())["memit_config"]


def test_registry_has_memit_and_memit_rep():
    assert {"memit", "memit+rep"} <= set(EDITORS)
    assert EDITORS["memit"] is memit.MEMITEditor and EDITORS["memit"].batched
    assert EDITORS["memit+rep"].base == "memit" and EDITORS["memit+rep"].uses_probes


# ---------------------------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama"]))
    covs = {layer: KeyCovariance(layer, n_tokens=2000, seq_len=64, progress=False).fit(model, hf_tiny.TRAINING_TEXT * 10)
            for layer in LAYERS}
    config = memit.MEMITConfig(layers=LAYERS, mom2_update_weight=2.0, v_num_grad_steps=4)
    edit = memit.compute_memit(model, REQUESTS, config, covs, PREFIXES)
    return model, covs, config, edit


def _residuals(model, requests, layer, prefixes=PREFIXES):
    """Independent reference of ``cur_zs``: full forward passes with a cache, read at the subject's last token and
    averaged over the prompt behind each prefix (keyscope's one key; ``("",)``: MEMIT's bare prompt)."""
    out = []
    for r in requests:
        located = [locate(model.tokenizer, prefixed(p, r.template), r.subject) for p in prefixes]
        ids, mask = pad_batch([enc.ids for enc, _ in located], 0)
        _, cache = model.run_with_cache(ids, attention_mask=mask)
        resid = cache[f"blocks.{layer}.hook_resid_post"]  # (batch, pos, d_model)
        out.append(torch.stack([resid[row, index] for row, (_, index) in enumerate(located)]).double().mean(0))
    return torch.stack(out)  # (n, d_model)


@pytest.mark.parametrize("reference", [False, True])
def test_layer_updates_follow_memits_loop_densely(tiny, reference):
    """Replay memit_main.py's loop with dense solves on the model edited layer by layer and compare each ΔW_l."""
    model, covs, config, edit = tiny
    if reference:
        config = dataclasses.replace(config, reference=True)
        edit = memit.compute_memit(model, REQUESTS, config, covs, PREFIXES)
    h_prefixes = ("",) if reference else PREFIXES
    before = {layer: W_out(model, layer).clone() for layer in LAYERS}
    Z = edit.z.double()  # (n, d_model)
    try:
        for i, layer in enumerate(LAYERS):
            keys = torch.stack([collect_keys(model, [prefixed(p, r.template) for p in PREFIXES],
                                             [r.subject] * len(PREFIXES), layer).mean(0) for r in REQUESTS])  # (n, d)
            R = (Z - _residuals(model, REQUESTS, LAYERS[-1], h_prefixes)) / (len(LAYERS) - i)  # (n, d_model)
            delta_W = R.T @ _dense(keys, covs[layer], config.mom2_update_weight)  # (d_model, d_mlp)
            assert torch.allclose(edit.updates[i].keys, keys, atol=1e-5)
            assert torch.allclose(edit.updates[i].delta_W.double(), delta_W, rtol=1e-4, atol=1e-6)
            W_out(model, layer).add_(delta_W.float())
    finally:
        for layer, W in before.items():
            W_out(model, layer).copy_(W)


def test_compute_leaves_weights_and_applied_restores_them_bit_exactly(tiny):
    model, covs, config, edit = tiny
    snapshot = {n: p.detach().clone() for n, p in model.original_model.named_parameters()}
    with edit.applied(model):
        for update in edit.updates:
            assert torch.equal(W_out(model, update.layer), snapshot_W(snapshot, model, update.layer) + update.delta_W)
    assert all(torch.equal(p, snapshot[n]) for n, p in model.original_model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"), edit.applied(model):
        raise RuntimeError("boom")
    assert all(torch.equal(p, snapshot[n]) for n, p in model.original_model.named_parameters())


def snapshot_W(snapshot, model, layer):
    current = W_out(model, layer)
    for name, p in model.original_model.named_parameters():
        if p.data_ptr() == current.data_ptr() or (p.dim() == 2 and p.T.data_ptr() == current.data_ptr()):
            return snapshot[name] if p.shape == current.shape else snapshot[name].T
    raise AssertionError("W_out not found")


def test_strength_is_one_at_each_requests_own_key_and_the_coefficient_of_its_residual(tiny):
    model, _, _, edit = tiny
    for update in edit.updates:
        for i in range(len(REQUESTS)):
            assert float(edit.strength(update.keys[i], update.layer, request=i)) == pytest.approx(1.0, abs=1e-5)
        k = torch.randn(5, update.keys.shape[1], generator=torch.Generator().manual_seed(5))
        moved = k @ update.delta_W.T  # (5, d_model): ΔW k
        recombined = sum(edit.strength(k, update.layer, request=i)[:, None] * update.own()[i] * update.residuals[i]
                         for i in range(len(REQUESTS)))
        assert torch.allclose(moved, recombined, atol=1e-4)
        view = edit.request_edit(1, update.layer)
        assert torch.allclose(view.strength(k), edit.strength(k, update.layer, request=1), atol=1e-6)
    with pytest.raises(KeyscopeError, match="not edited"):
        edit.strength(update.keys[0], layer=2)


def test_edits_move_the_last_layers_residual_toward_z(tiny):
    model, _, _, edit = tiny
    before = _residuals(model, REQUESTS, LAYERS[-1])
    with edit.applied(model):
        after = _residuals(model, REQUESTS, LAYERS[-1])
    Z = edit.z.double()
    assert ((Z - after).norm(dim=1) < (Z - before).norm(dim=1)).all()


def test_one_layer_at_lambda_zero_installs_z_exactly_on_the_prefix_averaged_residual(tiny):
    """The one key: with λ = 0 the last layer's update moves the residual, averaged over the prefixed prompts
    (where δ was optimised), exactly onto z — ROME's ``W' k* = v*`` for every request at once."""
    model, covs, config, _ = tiny
    config = dataclasses.replace(config, layers=(1,), mom2_update_weight=0.0)
    edit = memit.compute_memit(model, REQUESTS, config, covs, PREFIXES)
    with edit.applied(model):
        after = _residuals(model, REQUESTS, 1)
    assert torch.allclose(after, edit.z.double(), atol=1e-4 * float(edit.z.abs().max()))
    reference = memit.compute_memit(model, REQUESTS, dataclasses.replace(config, reference=True), covs, PREFIXES)
    with reference.applied(model):
        bare = _residuals(model, REQUESTS, 1, ("",))
    assert not torch.allclose(bare, reference.z.double(), atol=1e-4 * float(reference.z.abs().max()))  # two keys


def test_memit_rep_fits_an_adaptor_per_request_and_layer_and_undoes_everything(tiny):
    model, covs, config, _ = tiny
    from keyscope.editing.rep import REPConfig

    configs = {"rome": rome.ROMEConfig(context_template_length_params=((3, 2),)), "memit": config,
               "rep": REPConfig(steps=20, gate_negatives=False)}
    context = prepare_context(model, LAYERS[-1], covs[LAYERS[-1]], ["memit+rep"], configs=configs,
                              load_covariance=covs.__getitem__)
    editor = EDITORS["memit+rep"](model, context)
    probes = [[Probe(r.template, r.subject.split()[-1], "rephrase")] for r in REQUESTS[:2]]
    edit = editor.compute(REQUESTS[:2], probes)
    assert set(edit.adaptors) == {(i, layer) for i in range(2) for layer in LAYERS}
    assert edit.gated and edit.layers == LAYERS
    ids = torch.tensor([model.tokenizer("The actress Darrieux")["input_ids"]])
    snapshot = {n: p.detach().clone() for n, p in model.original_model.named_parameters()}
    with torch.no_grad():
        logits = model(ids)
    with edit.applied(model):
        pass
    with torch.no_grad():
        assert torch.equal(model(ids), logits)  # hooks removed
    assert all(torch.equal(p, snapshot[n]) for n, p in model.original_model.named_parameters())
    k = edit.base.updates[0].keys[0]
    assert edit.strength(k, LAYERS[0], request=0).shape == ()
    assert edit.gate(k[None], LAYERS[0]).shape == (1,)
