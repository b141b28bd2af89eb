from __future__ import annotations

import math
from contextlib import nullcontext
from itertools import islice

import pytest
import torch

from keyscope._infra.errors import KeyscopeError
from keyscope.analysis.covariance import KeyCovariance, load_or_compute_covariance
from keyscope.data import corpus as corpora
from keyscope.data.datasets import load_facts
from keyscope.editing import memit, rome
from keyscope.editing.base import ModelEdit
from keyscope.editing.rep import REPConfig
from keyscope.editing.request import EditRequest
from keyscope.evaluation import bounds
from keyscope.model.models import Norm, attention_norm, default_layer, final_norm, head_ov, load_model
from keyscope.studies.bounds import format_summary


def test_auroc_and_pearson():
    assert bounds.auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert bounds.auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert bounds.auroc([0.5, 0.5], [True, False]) == 0.5
    assert bounds.auroc([0.1, 0.2], [True, True]) is None
    assert bounds.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert bounds.pearson([1, 2], [1, 2]) is None and bounds.pearson([1, 1, 1], [1, 2, 3]) is None


@pytest.mark.parametrize("centred", [False, True])
def test_norm_adjoint_is_the_transpose_of_the_frozen_scale_linearisation(centred):
    g = torch.Generator().manual_seed(0)
    norm = Norm(torch.rand(16, generator=g, dtype=torch.float64) + 0.5, centred)
    delta, readout = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    assert float(norm.linear(delta, 1.7) @ readout) == pytest.approx(float(delta @ norm.adjoint(readout, 1.7)))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_heads_ov_and_norms_rebuild_the_attention_output(tiny_checkpoints, arch):
    """attn_out[t] = Σ_h Σ_s a[h, t, s] · norm(x_s) W_V[h] W_O[h] (+ biases): the pieces Lemma 4.4 uses are the
    model's own."""
    model = load_model(str(tiny_checkpoints[arch]))
    ids = torch.tensor([model.tokenizer("The Eiffel Tower is located in Paris")["input_ids"]])
    layer = 1
    names = [f"blocks.{layer}.ln1.hook_in", f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.attn.hook_pattern",
             f"blocks.{layer}.hook_attn_out", "ln_final.hook_scale"]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n in names)
    x = cache[names[0]][0].double()  # (pos, d_model)
    scale = cache[names[1]][0].double()  # (pos, 1)
    norm = attention_norm(model, layer)
    normed = norm.linear(x, scale)  # (pos, d_model): the norm without its bias
    ln = model.blocks[layer].ln1.original_component
    if getattr(ln, "bias", None) is not None:
        normed = normed + ln.bias.double()
    W_V, W_O = head_ov(model, layer)
    pattern = cache[names[2]][0].double()  # (H, pos, pos)
    per_head = torch.einsum("hts,sm,hmd,hdn->tn", pattern, normed, W_V.double(), W_O.double())  # (pos, d_model)
    expected = cache[names[3]][0].double()
    if arch == "gpt2":  # GPT-2's value and output biases (attention rows sum to 1)
        b_V = model.b_V[layer].double()  # (H, d_head)
        per_head = per_head + torch.einsum("hd,hdn->n", b_V, W_O.double()) + model.b_O[layer].double()
    assert torch.allclose(per_head, expected, atol=1e-4), (per_head - expected).abs().max()
    assert final_norm(model).weight.shape == (model.cfg.d_model,)


# ---------------------------------------------------------------------------------------------- combined strength

REQUESTS = [EditRequest("The actress {}", "Danielle Darrieux", "Paris"),
            EditRequest("{} played basketball for the", "Michael Jordan", "Lakers")]


def _memit_edit(n: int, layers: tuple[int, ...], d_model: int = 6, d_mlp: int = 12, lam: float = 3.0):
    """A MEMIT edit of ``n`` requests over ``layers`` from random keys, covariances and residuals, with MEMIT's
    update ``A_l = (λC_l + K_lK_lᵀ)⁻¹K_l``; and the covariances."""
    g = torch.Generator().manual_seed(len(layers) * 10 + n)
    updates, covs = [], {}
    for layer in layers:
        sample = torch.randn(300, d_mlp, generator=g) * torch.linspace(0.3, 2.0, d_mlp)  # (300, d_mlp)
        covs[layer] = KeyCovariance(layer, progress=False).partial_fit(sample)
        keys = torch.randn(n, d_mlp, generator=g)  # (n, d_mlp)
        A = memit.memit_update(keys, covs[layer], lam).float()  # (n, d_mlp)
        updates.append(memit.LayerUpdate(layer, torch.randn(n, d_model, generator=g), A, keys, keys[:, None]))
    edit = memit.MEMITEdit(REQUESTS[:n], updates, torch.zeros(n, d_model), ("",), memit.MEMITConfig(layers=layers))
    return edit, covs


def test_combined_strength_of_memit_is_the_projection_of_the_dense_written_value():
    """α({k_l}) = (Σ_l ΔW_l k_l)ᵀ Δv* / ‖Δv*‖² with Δv* = Σ_l ΔW_l k_{i,l}, from the dense ΔW_l (one request) or the
    request's dense share R_l[i] ⊗ A_l[i] (two), on random keys."""
    for n in (1, 2):
        edit, _ = _memit_edit(n, (0, 1, 2))
        g = torch.Generator().manual_seed(7)
        keys = {u.layer: torch.randn(5, u.keys.shape[1], generator=g) for u in edit.updates}  # {l: (5, d_mlp)}
        for i in range(n):
            shares = {u.layer: (u.delta_W.double() if n == 1 else
                                torch.outer(u.residuals[i].double(), u.key_selectors[i].double())) for u in edit.updates}
            dv_star = sum(shares[u.layer] @ u.keys[i].double() for u in edit.updates)  # (d_model,)
            written = sum(keys[layer].double() @ W.T for layer, W in shares.items())  # (5, d_model)
            expected = written @ dv_star / (dv_star @ dv_star)  # (5,)
            assert torch.allclose(edit.combined_strength(keys, request=i).double(), expected, atol=1e-4)
            assert torch.allclose(edit.value_direction(i).double(), dv_star, atol=1e-4 * float(dv_star.norm()))
            weights = edit.layer_weights(i)
            assert list(weights) == [0, 1, 2] and sum(weights.values()) == pytest.approx(1.0, abs=1e-9)
            own = {u.layer: u.keys[i] for u in edit.updates}
            assert float(edit.combined_strength(own, request=i)) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(KeyscopeError, match="layer 2"):
        edit.combined_strength({0: keys[0], 1: keys[1]})


def test_combined_strength_of_one_layer_is_romes_strength():
    edit, covs = _memit_edit(1, (1,))
    update, cov = edit.updates[0], covs[1]
    cov.cholesky()
    C = cov.C_ + cov.ridge_ * torch.eye(cov.C_.shape[0], dtype=torch.float64)  # keyscope's ridged C
    C_inv_k = torch.linalg.solve(C, update.keys[0].double())  # (d_mlp,)
    keys = torch.randn(4, C.shape[0], generator=torch.Generator().manual_seed(3))
    romes = keys.double() @ C_inv_k / (update.keys[0].double() @ C_inv_k)  # kᵀC⁻¹k* / k*ᵀC⁻¹k*
    assert edit.layer_weights() == {1: pytest.approx(1.0)}
    assert torch.allclose(edit.combined_strength({1: keys}).double(), romes, atol=1e-5)
    assert torch.allclose(edit.combined_strength({1: keys}), edit.strength(keys, 1))


class _Unstated(ModelEdit):
    """An edit that does not say what it writes."""

    requests, layers = (REQUESTS[0],), (3,)

    def applied(self, model, tau=None):
        return nullcontext()

    def strength(self, keys, layer=None, request=0, tau=None):
        return keys.sum(-1)


def test_default_combined_strength_of_a_one_layer_edit_and_the_missing_value_direction():
    edit = _Unstated()
    keys = torch.randn(2, 5)
    assert edit.layer_weights() == {3: 1.0} and torch.equal(edit.combined_strength({3: keys}), keys.sum(-1))
    with pytest.raises(KeyscopeError, match="value_direction"):
        edit.value_direction()


# ---------------------------------------------------------------------------------------------- runs on factworld


@pytest.fixture(scope="module")
def factworld():
    model = load_model()
    layer = default_layer(model)
    covs = {}

    def covariance(L):
        if L not in covs:
            covs[L] = load_or_compute_covariance(model, L, n_tokens=20_000, progress=False)
        return covs[L]

    return model, load_facts("factworld"), layer, covariance


def _params(model):
    return {n: p.detach().clone() for n, p in model.original_model.named_parameters()}


@pytest.mark.slow
def test_bounds_run_of_memit_and_memit_rep_on_factworld(factworld, monkeypatch):
    model, facts, layer, covariance = factworld
    quick = memit.MEMITConfig.for_model
    monkeypatch.setattr(memit.MEMITConfig, "for_model", staticmethod(lambda m, **kw: quick(m, v_num_grad_steps=10, **kw)))
    snapshot = _params(model)
    config = bounds.BoundsConfig(n=2, methods=("memit", "memit+rep"), scan_tokens=2000, scan_top_k=2)
    result = bounds.run(model, facts, layer, covariance(layer), list(islice(corpora.documents("factworld"), 20)),
                        corpus="factworld", config=config, rep_config=REPConfig(steps=20), progress=False,
                        load_covariance=covariance)
    assert all(torch.equal(p.detach(), snapshot[n]) for n, p in model.original_model.named_parameters())
    assert result.n_edited == 2 and {r["method"] for r in result.lemma_4_4_rows} == {"memit"}
    for method in ("memit", "memit+rep"):
        mine = [r for r in result.query_rows if r["method"] == method]
        assert {r["kind"] for r in mine} >= {"rephrase", "neighbourhood", "corpus"}
        assert all(math.isfinite(r["alpha"]) and math.isfinite(r.get("alpha_max", 0.0)) for r in mine)
    s = result.summary
    assert set(s["lemma_4_4"]["methods"]) == {"memit"}
    assert s["lemma_4_4"]["holds_fraction"] == s["lemma_4_4"]["methods"]["memit"]["holds_fraction"]
    assert set(s["lemma_4_6"]["methods"]) == {"memit", "memit+rep"}
    assert {"auroc", "positives"} <= set(s["lemma_4_7"]["corpus"])
    text = format_summary(result)
    assert "memit+rep" in text and "ROME edits" not in text


@pytest.mark.slow
def test_bounds_run_of_rome_keeps_the_value_check_an_identity(factworld):
    model, facts, layer, covariance = factworld
    config = bounds.BoundsConfig(n=2, methods=("rome",), scan_top_k=0)
    result = bounds.run(model, facts, layer, covariance(layer), list(islice(corpora.documents("factworld"), 20)),
                        config=config, rome_config=rome.ROMEConfig.for_model(model, v_num_grad_steps=10),
                        progress=False)
    assert result.summary["lemma_4_6"]["value_check_pearson"] == pytest.approx(1.0, abs=1e-4)
    assert set(result.summary["lemma_4_4"]["methods"]) == {"rome"}
    assert format_summary(result).splitlines()[0].endswith("2 ROME edits")
    payload = result.as_json()  # the settings the run edited with
    assert payload["rome_config"]["v_num_grad_steps"] == 10 and "rep_config" not in payload  # no REP in the run


def test_summary_and_report_give_lemma_4_4_per_edit_method():
    def edit_row(case_id, method, holds):
        return {"case_id": case_id, "method": method, "eps1": 1.0, "eps2": 1.0, "needed": 2.0,
                "best_gain_unit": 3.0 if holds else 1.0, "best_gain_attention": 1.0, "best_head": (2, 0),
                "single_head_holds": holds, "delta_v_norm": 5.0, "norm_bound": 1.0, "norm_bound_holds": True}

    l44 = [edit_row(1, "rome", True), edit_row(1, "memit", False), edit_row(2, "rome", True), edit_row(2, "memit", True)]
    queries = [{"case_id": c, "method": m, "kind": k, "alpha": a, "alpha_max": a, "success": a > 0.5,
                "value_coefficient": a, "gap_change": a}
               for c in (1, 2) for m in ("rome", "memit", "memit+rep") for k, a in (("rephrase", 0.2), ("shuffle", 0.9))]
    summary = bounds.summarize(l44, queries, ["rome", "memit", "memit+rep"])
    assert summary["lemma_4_4"]["holds_fraction"] == 1.0  # the first edit method's at the top level
    assert {m: s["holds_fraction"] for m, s in summary["lemma_4_4"]["methods"].items()} == {"rome": 1.0, "memit": 0.5}
    result = bounds.BoundsResult("m", 1, l44, queries, summary, bounds.BoundsConfig(n=2),
                                 edit_layers={"rome": [1], "memit": [1, 2, 3]})
    text = format_summary(result)
    assert result.n_edited == 2 and "ROME edits" not in text and "memit 1,2,3" in text
    assert "  memit:" in text and "50.0% of edits" in text
    legacy = bounds.summarize([{k: v for k, v in r.items() if k != "method"} for r in l44[::2]], queries, ["rome"])
    assert legacy["lemma_4_4"]["methods"]["rome"]["holds_fraction"] == 1.0  # rows written before the method column
