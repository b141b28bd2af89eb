from __future__ import annotations

import pytest
import torch

from keyscope import bounds
from keyscope.models import Norm, attention_norm, final_norm, head_ov, load_model


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
