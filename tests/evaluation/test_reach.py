from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from keyscope.analysis import scan
from keyscope.analysis.covariance import KeyCovariance
from keyscope.data.corpus import token_batches
from keyscope.data.perturbations import Probe
from keyscope.editing import rome
from keyscope.editing.base import ModelEdit
from keyscope.editing.request import EditRequest
from keyscope.evaluation import reach
from keyscope.model.models import load_model
from tests import hf_tiny

LAYER = 1
CORPUS = hf_tiny.TRAINING_TEXT * 2
#: The subject ends the prompt (see tests/editing/test_rome.py: on a random tiny model δ reaches the logits there).
REQUEST = EditRequest("The actress {}", "Danielle Darrieux", "Paris", target_true="French")
CONFIG = reach.ReachConfig(n_tokens=600, top_k=6, seq_len=32, batch_size=3, window=3, prefix_tokens=5,
                           check_batch_size=4)


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return load_model(str(tiny_checkpoints["gpt2"]))


@pytest.fixture(scope="module")
def cov(model):
    return KeyCovariance(LAYER, n_tokens=1500, seq_len=64, progress=False).fit(model, hf_tiny.TRAINING_TEXT * 10)


@pytest.fixture(scope="module")
def edit(model, cov):
    return rome.ROMEEdits([rome.compute_edit(model, REQUEST, LAYER, cov)])


class TwoLayerEdit(ModelEdit):
    """A made-up edit of two layers with a nonlinear strength per layer (as a gated or batch editor has)."""

    def __init__(self, d_mlp: int):
        generator = torch.Generator().manual_seed(3)
        self.u = {0: torch.randn(d_mlp, generator=generator), 1: torch.randn(d_mlp, generator=generator)}
        self.requests = (REQUEST,)
        self.layers = (0, 1)

    @contextmanager
    def applied(self, model, tau=None):
        yield model

    def strength(self, keys, layer=None, request=0, tau=None):
        return torch.tanh(keys.float() @ self.u[self._layer(layer)] / 4)  # (...,)


def _dense(model, edit, config, variants):
    """Every position's strength (largest over the edit's layers) and strict exclusion, the slow obvious way."""
    batches = list(token_batches(model.tokenizer, CORPUS, config.n_tokens, config.seq_len, config.batch_size))
    per_layer = torch.stack([torch.cat([edit.strength(scan.layer_keys_of(model, b, layer), layer) for b in batches])
                             for layer in edit.layers], -1)  # (N, n_layers)
    stream = torch.cat([b.input_ids[b.key_mask] for b in batches]).tolist()
    excluded = torch.zeros(len(stream), dtype=torch.bool)
    for variant in variants:
        m = len(variant)
        for t in range(m - 1, len(stream)):
            if tuple(stream[t - m + 1 : t + 1]) == tuple(variant):
                excluded[t - m + 1 : t + config.window + 1] = True
    return per_layer, excluded, batches


@pytest.mark.parametrize("kind", ["rome", "two_layers"])
def test_scan_top_equals_a_dense_strength_at_every_position(model, edit, kind):
    edit = edit if kind == "rome" else TwoLayerEdit(model.cfg.d_mlp)
    variants = reach.subject_variants(model.tokenizer, REQUEST) + ((model.tokenizer(" the")["input_ids"][-1],),)
    probes = [Probe(REQUEST.template, REQUEST.subject), Probe(REQUEST.template, "Darrieux", "rephrase"),
              Probe(REQUEST.template, "Danielle", "rephrase"), Probe(REQUEST.template, "D. Darrieux", "rephrase")]
    result = reach.analyse(model, edit, CORPUS, probes, variants, CONFIG, progress=False)
    per_layer, excluded, _ = _dense(model, edit, CONFIG, variants)
    best = per_layer.amax(-1).masked_fill(excluded, float("-inf"))  # (N,)
    scores, positions = best.topk(CONFIG.top_k)
    assert excluded.any() and result.n_excluded == int(excluded.sum()) and result.n_tokens == 600
    assert [r.position for r in result.top] == positions.tolist()
    torch.testing.assert_close(torch.tensor([r.strength for r in result.top]), scores, rtol=1e-4, atol=1e-5)
    # the forms: the edit prompt apart, the three rephrasings give the reference; the verdict counts densely
    assert result.original.kind == "original" and [f.kind for f in result.missed] == ["rephrase"] * 3
    assert result.reference == pytest.approx(float(np.median([f.strength for f in result.missed])))
    assert result.n_above_reference == int((best > result.reference).sum())
    assert str(result.n_above_reference) in result.verdict and "median rephrasing" in result.verdict


def _direct(model, edit, windows, position):
    """KL and flip at ``position`` from the whole scanned window, before and inside ``rome.applied``."""
    batch, row, col = windows[position]
    ids = batch.input_ids[row : row + 1]
    mask = batch.attention_mask[row : row + 1]
    with torch.no_grad():
        log_p = model(ids, attention_mask=mask, return_type="logits")[0, col].double().log_softmax(-1)
        with rome.applied(model, *edit.edits):
            log_q = model(ids, attention_mask=mask, return_type="logits")[0, col].double().log_softmax(-1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum")
    return float(kl), bool(log_p.argmax() != log_q.argmax())


def test_check_kl_equals_a_direct_computation_and_leaves_the_model_unchanged(model, edit):
    variants = reach.subject_variants(model.tokenizer, REQUEST)
    result = reach.analyse(model, edit, CORPUS, (), variants, CONFIG, progress=False)
    weights = {n: p.detach().clone() for n, p in model.original_model.named_parameters()}
    checked = reach.check(model, edit, CORPUS, result, variants, CONFIG)
    assert all(torch.equal(p, weights[n]) for n, p in model.original_model.named_parameters())
    _, excluded, batches = _dense(model, edit, CONFIG, variants)
    windows, seen = {}, 0
    for batch in batches:
        rows, cols = batch.key_mask.nonzero(as_tuple=True)
        for i in range(rows.shape[0]):
            windows[seen + i] = (batch, int(rows[i]), int(cols[i]))
        seen += int(rows.shape[0])
    assert max(r.kl for r in checked.top) > 1e-4, "the edit changes the model at its top positions"
    top = [r.position for r in checked.top]
    randoms = [r.position for r in checked.random]
    assert top == [r.position for r in result.top] and len(randoms) == len(top)
    assert not set(top) & set(randoms) and not any(excluded[p] for p in randoms) and len(set(randoms)) == len(randoms)
    for r in (*checked.top, *checked.random):
        kl, flipped = _direct(model, edit, windows, r.position)
        assert r.kl == pytest.approx(kl, rel=1e-3, abs=1e-7) and r.flipped == flipped
    for ours, scanned in zip(checked.top, result.top):  # the re-run's strength is the scanned one
        assert ours.strength == pytest.approx(scanned.strength, rel=1e-4, abs=1e-5) and ours.prefix == scanned.prefix
    # the definitions: changed, precision@K, medians, Spearman
    random_kl = np.array([r.kl for r in checked.random])
    assert checked.kl_threshold == pytest.approx(float(np.quantile(random_kl, 0.95)))
    for r in (*checked.top, *checked.random):
        assert r.changed == (r.kl > checked.kl_threshold or r.flipped)
    assert checked.precision_at_k == pytest.approx(np.mean([r.changed for r in checked.top]))
    assert checked.top_kl_median == pytest.approx(np.median([r.kl for r in checked.top]))
    assert checked.random_kl_median == pytest.approx(np.median(random_kl))
    from scipy.stats import spearmanr

    everything = (*checked.top, *checked.random)
    expected = spearmanr([r.strength for r in everything], [r.kl for r in everything]).statistic
    assert checked.spearman == pytest.approx(expected)
    # the random positions' prefixes are the scan's: the window's tokens ending at the position
    batch, row, col = windows[randoms[0]]
    first = max(1 if batch.input_ids[row, 0] == model.tokenizer.bos_token_id else 0, col - CONFIG.prefix_tokens + 1)
    assert checked.random[0].prefix == model.tokenizer.decode(batch.input_ids[row, first : col + 1],
                                                              skip_special_tokens=True)


def test_random_positions_follow_the_seed(model, edit):
    variants = reach.subject_variants(model.tokenizer, REQUEST)
    result = reach.analyse(model, edit, CORPUS, (), variants, CONFIG, progress=False)
    again = [r.position for r in reach.check(model, edit, CORPUS, result, variants, CONFIG).random]
    same = [r.position for r in reach.check(model, edit, CORPUS, result, variants, CONFIG).random]
    other = reach.ReachConfig(**{**CONFIG.__dict__, "seed": 1})
    assert again == same and again != [r.position for r in reach.check(model, edit, CORPUS, result, variants,
                                                                           other).random]


def test_json_has_the_must_show_keys(model, edit):
    variants = reach.subject_variants(model.tokenizer, REQUEST)
    result = reach.analyse(model, edit, CORPUS, [Probe(REQUEST.template, "Darrieux", "rephrase")], variants, CONFIG,
                           progress=False)
    result.check = reach.check(model, edit, CORPUS, result, variants, CONFIG)
    out = result.as_json()
    assert len(out["top"]) == CONFIG.top_k and all({"prefix", "strength", "kl"} <= set(t) for t in out["top"])
    assert out["missed"][0]["subject"] == "Darrieux" and isinstance(out["missed"][0]["strength"], float)
    assert {"precision_at_k", "spearman", "random_kl_median", "top_kl_median"} <= set(out["check"])
    assert out["top"][0]["strengths"] == {str(LAYER): pytest.approx(out["top"][0]["strength"])}


def test_kl_and_spearman_helpers():
    log_p = torch.tensor([[0.7, 0.2, 0.1]]).log()
    assert reach.kl_divergence(log_p, log_p).item() == pytest.approx(0.0)
    log_q = torch.tensor([[0.1, 0.2, 0.7]]).log()
    assert reach.kl_divergence(log_p, log_q).item() == pytest.approx(0.6 * np.log(7))
    assert reach.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert reach.spearman([1, 1, 1], [1, 2, 3]) is None and reach.spearman([1, 2], [2, 1]) is None


def test_config_validates():
    with pytest.raises(ValueError):
        reach.ReachConfig(top_k=0)
    with pytest.raises(ValueError):
        reach.ReachConfig(changed_quantile=1.0)
