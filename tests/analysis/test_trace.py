from __future__ import annotations

import math

import pytest
import torch

from keyscope.analysis import trace
from keyscope.data.datasets import load_facts
from keyscope.model.models import embed_hook, load_model, value_hook

CONFIG = trace.TraceConfig(n=3, samples=2, seed=0)


@pytest.fixture(scope="module")
def model():
    return load_model("factworld")


@pytest.fixture(scope="module")
def facts():
    return load_facts("factworld")[:60]


@pytest.fixture(scope="module")
def result(model, facts):
    return trace.trace_facts(model, facts, CONFIG, progress=False)


def _brute_force_mlp_effect(model, fact, index: int, layer: int, sigma: float) -> float:
    """One fact, one layer, one noise draw per forward pass, no batching: the indirect effect of restoring the
    layer's MLP output at the subject's last token, by hand."""
    prompt = trace._prompt(model.tokenizer, fact)
    draws = trace._noise(index, prompt, CONFIG, sigma, int(model.cfg.d_model))  # (samples, n_subject, d)
    ids = torch.tensor([prompt.ids])
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name == value_hook(layer))
    clean = cache[value_hook(layer)][0, prompt.last].clone()

    def p_target(restore: bool, s: int) -> float:
        def corrupt(act, hook):
            act = act.clone()
            act[0, prompt.first : prompt.last + 1] += draws[s]
            return act

        def put_back(act, hook):
            act = act.clone()
            act[0, prompt.last] = clean
            return act

        hooks = [(embed_hook(), corrupt)] + ([(value_hook(layer), put_back)] if restore else [])
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(ids)[0, -1]
        return float(logits.float().softmax(-1)[prompt.target])

    corrupted = sum(p_target(False, s) for s in range(CONFIG.samples)) / CONFIG.samples
    restored = sum(p_target(True, s) for s in range(CONFIG.samples)) / CONFIG.samples
    return restored - corrupted


def test_batched_trace_equals_an_unbatched_brute_force(model, facts, result):
    by_id = {f.case_id: f for f in facts}
    for index in (0, 2):
        traced = result.facts[index]
        for layer in (0, 1, 3):
            expected = _brute_force_mlp_effect(model, by_id[traced.case_id], index, layer, result.sigma)
            assert traced.mlp[layer] == pytest.approx(expected, abs=2e-5), (index, layer)


def test_trace_does_not_depend_on_batching_and_is_deterministic(model, facts, result):
    small = trace.trace_facts(model, facts, trace.TraceConfig(n=3, samples=2, batch_size=1, max_rows=5), progress=False)
    again = trace.trace_facts(model, facts, CONFIG, progress=False)
    assert again.as_json() == result.as_json()
    for a, b in zip(small.facts, result.facts):
        assert a.case_id == b.case_id
        assert a.mlp == pytest.approx(b.mlp, abs=1e-5) and a.attn == pytest.approx(b.attn, abs=1e-5)


def test_trace_shape_last_layer_and_window(model, facts, result):
    out = result.as_json()
    n = int(model.cfg.n_layers)
    assert len(out["indirect_effect"]["mlp"]) == len(out["indirect_effect"]["attn"]) == n
    assert out["layer"] == max(range(n), key=lambda layer: out["indirect_effect"]["mlp"][layer])
    # nothing after the last layer reads the subject's last token: restoring it there changes nothing
    assert all(abs(f.mlp[-1]) < 1e-6 and abs(f.attn[-1]) < 1e-6 for f in result.facts)
    assert 0 < out["p_corrupted"] < out["p_clean"] <= 1
    wide = trace.trace_facts(model, facts, trace.TraceConfig(n=3, samples=2, window=3), progress=False)
    assert wide.indirect_effect["mlp"] != result.indirect_effect["mlp"]
    assert wide.total_effect == pytest.approx(result.total_effect)  # the clean and corrupted runs are the same


def test_heatmap_at_the_subject_matches_the_profile(model, facts, result):
    fact = next(f for f in facts if f.case_id == result.facts[0].case_id)
    heat = trace.heatmap(model, fact, CONFIG, sigma=result.sigma)
    assert heat.effects["mlp"].shape == (len(heat.tokens), int(model.cfg.n_layers))
    # the heat map's draws are seeded as fact 0's, so its subject-last-token row is that fact's profile
    row = heat.effects["mlp"][heat.subject[1]]
    assert row.tolist() == pytest.approx(list(result.facts[0].mlp), abs=1e-5)


@pytest.mark.parametrize("bad", [{"noise_scale": math.nan}, {"noise_scale": 0.0}, {"n": 0}, {"max_rows": 0}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        trace.TraceConfig(**bad)
