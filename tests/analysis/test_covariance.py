from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from keyscope._infra import cache
from keyscope._infra.errors import EmptyCorpus
from keyscope.analysis import covariance
from keyscope.analysis.covariance import KeyCovariance, load_or_compute_covariance
from keyscope.data.corpus import token_batches
from keyscope.model.models import W_out, key_hook, load_model
from tests import hf_tiny

LAYER = 1
DOCS = hf_tiny.TRAINING_TEXT * 3


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {arch: load_model(str(tiny_checkpoints[arch])) for arch in ("gpt2", "llama")}


def _reference_C(model, docs, n_tokens, seq_len):
    """C from all keys at once: each window run alone (no padding) through run_with_cache."""
    keys = []
    for batch in token_batches(model.tokenizer, docs, n_tokens, seq_len=seq_len, batch_size=1):
        real = batch.attention_mask[0].bool()
        ids = batch.input_ids[:, real]  # (1, n_real)
        _, cache_ = model.run_with_cache(ids, names_filter=key_hook(LAYER))
        keys.append(cache_[key_hook(LAYER)][0][batch.key_mask[0, real]])
    K = torch.cat(keys).double()  # (n, d_mlp)
    return K.T @ K / K.shape[0], K.shape[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_streaming_C_equals_C_from_all_keys(models, arch):
    model = models[arch]
    cov = KeyCovariance(LAYER, n_tokens=700, seq_len=48, batch_size=3, progress=False).fit(model, DOCS)
    C_ref, n = _reference_C(model, DOCS, 700, 48)
    assert cov.n_tokens_ == n == 700
    assert cov.C_.dtype == torch.float64 and cov.C_.shape == (model.cfg.d_mlp, model.cfg.d_mlp)
    torch.testing.assert_close(cov.C_, C_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cov.C_, cov.C_.T, rtol=0, atol=0)
    assert cov.spec_["excluded"] == ["bos", "padding"] and cov.spec_["n_tokens"] == 700


def test_partial_fit_blocked_gram_is_exact():
    g = torch.Generator().manual_seed(0)
    d = 301  # not a multiple of the Gram blocks
    keys = torch.randn(2000, d, generator=g) * torch.rand(d, generator=g) + 0.3  # non-centred
    cov = KeyCovariance(0, progress=False)
    for chunk in keys.split(333):
        cov.partial_fit(chunk)
    dense = keys.double().T @ keys.double() / keys.shape[0]
    assert cov.n_tokens_ == 2000
    torch.testing.assert_close(cov.C_, dense, rtol=1e-6, atol=1e-8)


def test_solve_is_a_cholesky_solve_with_documented_ridge():
    g = torch.Generator().manual_seed(1)
    d = 64
    keys = torch.randn(5000, d, generator=g) + 0.5
    cov = KeyCovariance(0, progress=False).partial_fit(keys)
    C = cov.C_.numpy()
    k = torch.randn(3, d, generator=g)
    x = cov.solve(k)
    assert x.dtype == torch.float64 and x.shape == (3, d)
    assert cov.ridge_ == pytest.approx(1e-6 * np.trace(C) / d)
    expected = np.linalg.solve(C + cov.ridge_ * np.eye(d), k.double().numpy().T).T
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(x.numpy(), (np.linalg.inv(C) @ k.double().numpy().T).T, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(cov.solve(k[0]).numpy(), x[0].numpy(), rtol=1e-12)


def test_rank_deficient_C_is_still_solvable():
    g = torch.Generator().manual_seed(2)
    cov = KeyCovariance(0, progress=False).partial_fit(torch.randn(10, 40, generator=g))  # rank 10 < 40
    x = cov.solve(torch.randn(40, generator=g))
    assert torch.isfinite(x).all() and cov.ridge_ > 0
    zero = KeyCovariance(0, progress=False).partial_fit(torch.zeros(5, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(zero.solve(torch.ones(8))).all()


def test_unfitted_raises():
    with pytest.raises(RuntimeError, match="not fitted"):
        _ = KeyCovariance(0).C_


def test_short_and_empty_corpus(models):
    model = models["llama"]
    with pytest.warns(UserWarning, match="ran out"):
        cov = KeyCovariance(LAYER, n_tokens=50, progress=False).fit(model, ["Paris is big."])
    assert 0.1 * 50 <= cov.n_tokens_ < 50
    with pytest.raises(EmptyCorpus, match=f"only {cov.n_tokens_} of the 10,000 tokens"):  # far fewer: refused
        KeyCovariance(LAYER, n_tokens=10_000, progress=False).fit(model, ["Paris is big."])
    with pytest.raises(EmptyCorpus):
        KeyCovariance(LAYER, n_tokens=100, progress=False).fit(model, [])


def test_a_corpus_of_unknown_tokens_or_binary_is_refused_and_not_cached(models, tmp_path):
    model = models["llama"]  # LLaMA-style BPE without byte fallback: unseen characters are <unk>
    with pytest.raises(EmptyCorpus, match="unknown token"):
        load_or_compute_covariance(model, LAYER, ["ΩΨΦ ЖЗИ ∑∫∂ " * 50], n_tokens=200, progress=False, root=tmp_path)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(EmptyCorpus, match="blob.txt is binary"):
        load_or_compute_covariance(model, LAYER, str(binary), n_tokens=200, progress=False, root=tmp_path / "c")
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing cached


def test_load_or_compute_caches_and_detects_corruption(models, tmp_path, monkeypatch):
    model = models["gpt2"]
    calls = []
    real_fit = KeyCovariance.fit

    def counting_fit(self, *args, **kwargs):
        calls.append(1)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(KeyCovariance, "fit", counting_fit)
    kwargs = dict(corpus=DOCS, n_tokens=300, seq_len=32, progress=False, root=tmp_path)
    first = load_or_compute_covariance(model, LAYER, **kwargs)
    second = load_or_compute_covariance(model, LAYER, **kwargs)
    assert len(calls) == 1
    torch.testing.assert_close(first.C_, second.C_, rtol=0, atol=0)
    assert second.n_tokens_ == 300 and second.spec_["layer"] == LAYER
    k = torch.randn(model.cfg.d_mlp, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first.solve(k), second.solve(k))

    load_or_compute_covariance(model, LAYER, recompute=True, **kwargs)
    assert len(calls) == 2
    load_or_compute_covariance(model, LAYER + 1, **kwargs)  # another layer: another artefact
    assert len(calls) == 3

    spec = covariance.covariance_spec(model, covariance.CovarianceConfig(LAYER, 300, 32), DOCS)
    path = cache.artefact_dir(covariance.KIND, spec, tmp_path) / cache.TENSORS
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="recomputing"):
        again = load_or_compute_covariance(model, LAYER, **kwargs)
    assert len(calls) == 4
    torch.testing.assert_close(again.C_, first.C_, rtol=1e-12, atol=1e-12)


def test_fingerprint_tracks_upstream_weights_only(models):
    model = models["gpt2"]
    before, whole = covariance.upstream_fingerprint(model, LAYER), covariance.weights_fingerprint(model)
    saved = {layer: W_out(model, layer).detach().clone() for layer in (LAYER - 1, LAYER)}
    try:
        with torch.no_grad():
            W_out(model, LAYER).add_(1.0)  # an edit at the layer itself does not change its keys
            assert covariance.upstream_fingerprint(model, LAYER) == before
            assert covariance.weights_fingerprint(model) != whole  # but it changes the model's outputs
            W_out(model, LAYER - 1).add_(1.0)  # an earlier layer does
            assert covariance.upstream_fingerprint(model, LAYER) != before
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                W_out(model, layer).copy_(weight)
    assert covariance.upstream_fingerprint(model, LAYER) == before
    assert covariance.weights_fingerprint(model) == whole


def test_state_dict_roundtrip_and_merge_are_exact():
    torch.manual_seed(3)
    d = 300  # blocked Gram (d ≥ 256)
    keys = torch.randn(900, d) + 0.2
    whole = KeyCovariance(0, progress=False).add(keys[:400]).add(keys[400:])
    state = whole.state_dict()
    assert state["sum"].dtype == torch.float64 and state["n_tokens"] == 900 and state["config"]["layer"] == 0
    restored = KeyCovariance(5, progress=False).load_state_dict(state)
    assert restored.config == whole.config and restored.n_tokens_ == 900
    torch.testing.assert_close(restored.C_, whole.C_, rtol=0, atol=0)
    # state_dict is a copy: adding to the restored estimate leaves the saved state alone
    restored.add(keys[:10])
    assert state["n_tokens"] == 900 and whole.n_tokens_ == 900

    first = KeyCovariance(0, progress=False).add(keys[:400])
    second = KeyCovariance(0, progress=False).add(keys[400:])
    merged = first.merge(second).merge(KeyCovariance(0, progress=False))  # an empty shard changes nothing
    assert merged.n_tokens_ == 900
    torch.testing.assert_close(merged.C_, whole.C_, rtol=1e-12, atol=0)
    dense = keys.double().T @ keys.double() / 900
    torch.testing.assert_close(merged.C_, dense, rtol=1e-6, atol=1e-6)  # float32 Gram products
    with pytest.raises(ValueError, match="layer"):
        merged.merge(KeyCovariance(1, progress=False).add(keys[:5]))
    with pytest.raises(ValueError, match="features"):
        KeyCovariance(0, progress=False).add(keys).add(torch.randn(4, d + 1))


def test_add_batch_several_layers_in_one_pass_equals_one_fit_per_layer(models):
    model = models["llama"]
    batches = list(token_batches(model.tokenizer, DOCS, 500, seq_len=40, batch_size=4))
    together = {layer: KeyCovariance(layer, progress=False) for layer in (0, LAYER)}
    counted = sum(covariance.add_batch(model, together, batch) for batch in batches)
    assert counted == 500
    for layer in (0, LAYER):
        alone = KeyCovariance(layer, n_tokens=500, progress=False).fit_batches(model, batches)
        assert together[layer].n_tokens_ == 500
        torch.testing.assert_close(together[layer].C_, alone.C_, rtol=0, atol=0)
    C_ref, _ = _reference_C(model, DOCS, 500, 40)
    torch.testing.assert_close(together[LAYER].C_, C_ref, rtol=1e-5, atol=1e-7)
