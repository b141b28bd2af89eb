from __future__ import annotations

import numpy as np
import pytest
import torch

from keyscope.analysis import similarity as sim
from keyscope.analysis.covariance import KeyCovariance
from keyscope.data import perturbations as pt
from keyscope.model.models import load_model
from tests import hf_tiny, reference

LAYER = 1


@pytest.fixture(scope="module")
def fitted():
    g = torch.Generator().manual_seed(0)
    d = 48
    mixing = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d**0.5  # well conditioned: the ridge is negligible
    keys = torch.randn(4000, d, generator=g) @ mixing + 0.2  # correlated, non-centred
    return KeyCovariance(0, progress=False).partial_fit(keys)


# ------------------------------------------------------------------------------------- similarity maths


def test_whitened_similarity_equals_dense_numpy_formula(fitted):
    g = torch.Generator().manual_seed(3)
    C = fitted.C_.numpy()
    C_inv = np.linalg.inv(C)
    k1, k2 = torch.randn(48, generator=g), torch.randn(48, generator=g)
    expected = k1.double().numpy() @ C_inv @ k2.double().numpy()
    got = sim.whitened_similarity(k1, k2, fitted)
    assert got.dtype == torch.float64 and got.dim() == 0
    np.testing.assert_allclose(got.item(), expected, rtol=1e-4)
    C_ridge_inv = np.linalg.inv(C + fitted.ridge_ * np.eye(48))  # exactly what is solved
    np.testing.assert_allclose(got.item(), k1.double().numpy() @ C_ridge_inv @ k2.double().numpy(), rtol=1e-9)

    A, B = torch.randn(5, 48, generator=g), torch.randn(7, 48, generator=g)
    M = sim.whitened_similarity_matrix(A, B, fitted)
    np.testing.assert_allclose(M.numpy(), A.double().numpy() @ C_inv @ B.double().numpy().T, rtol=1e-4, atol=1e-4)
    pairs = sim.whitened_similarity(A, B[:5], fitted)  # row-wise pairs
    np.testing.assert_allclose(pairs.numpy(), np.diag(M.numpy()[:, :5]), rtol=1e-10)
    sym = sim.whitened_similarity_matrix(A, None, fitted)
    np.testing.assert_allclose(sym.numpy(), sym.numpy().T, rtol=1e-10)
    np.testing.assert_allclose(sim.whitened_norm(A, fitted).numpy() ** 2, np.diag(sym.numpy()), rtol=1e-10)


def test_edit_strength(fitted):
    g = torch.Generator().manual_seed(4)
    C_inv = np.linalg.inv(fitted.C_.numpy())
    k_star, keys = torch.randn(48, generator=g), torch.randn(6, 48, generator=g)
    s = sim.edit_strength(keys, k_star, fitted)
    ks = k_star.double().numpy()
    expected = keys.double().numpy() @ C_inv @ ks / (ks @ C_inv @ ks)
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-4, atol=1e-7)
    assert sim.edit_strength(k_star, k_star, fitted).item() == pytest.approx(1.0, abs=1e-12)
    assert sim.edit_strength(3 * k_star.double(), k_star, fitted).item() == pytest.approx(3.0, abs=1e-12)
    S = sim.edit_strength_matrix(keys, keys[:4], fitted)
    assert S.shape == (6, 4)
    np.testing.assert_allclose(np.diag(S.numpy()[:4]), 1.0, rtol=1e-12)
    np.testing.assert_allclose(S[:, 2].numpy(), sim.edit_strength(keys, keys[2], fitted).numpy(), rtol=1e-10)


def test_probe_keys_and_edit_strength_on_a_model(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama"]))
    cov = KeyCovariance(LAYER, n_tokens=400, seq_len=32, progress=True).fit(model, hf_tiny.TRAINING_TEXT)
    fact = pt.Probe("{} is located in", "The Eiffel Tower")
    probes = [fact, *pt.shuffled_subjects(model.tokenizer, fact.template, fact.subject, n=3),
              *pt.other_subjects(fact.template, fact.subject, ["Big Ben", "Apple A5"]),
              pt.long_context(model.tokenizer, fact.template, fact.subject, hf_tiny.TRAINING_TEXT, n_tokens=40)]
    keys = sim.probe_keys(model, probes, LAYER)  # (n, d_mlp)
    s = sim.edit_strength(keys, keys[0], cov)
    assert s.shape == (len(probes),) and s[0].item() == pytest.approx(1.0, abs=1e-9)
    # dense reference: one full, unpadded forward pass per probe, the key read off the cache at the last token
    # overlapping the subject's slot, and the strength solved in numpy against C + ridge·I
    dense = np.stack([reference.dense_key(model, p.template, p.subject, LAYER) for p in probes])  # (n, d_mlp)
    np.testing.assert_allclose(keys.double().numpy(), dense, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s.numpy(), reference.dense_strength(dense, dense[0], cov), rtol=1e-3, atol=1e-4)
    assert len(set(np.round(s.numpy(), 3))) == len(probes)  # every probe a different key
