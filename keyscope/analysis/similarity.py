"""Whitened key similarity and ROME's edit strength.

A ROME edit at key ``k*`` changes ``W_out`` by ``ΔW = Λ (C⁻¹k*)ᵀ`` with ``Λ`` chosen so that
``ΔW k* = Λ · k*ᵀC⁻¹k*`` installs the new value (Meng et al. 2022, eq. 2). Any other key ``k`` is moved by
``ΔW k = Λ · kᵀC⁻¹k*``, i.e. by the fraction

    s(k; k*) = kᵀC⁻¹k* / k*ᵀC⁻¹k*                                    (normalised edit strength)

of the full edit: ``s = 1`` means ``k`` receives the whole edit, ``s ≈ 0`` that it is untouched. Yan et al.
("Keys to Robust Edits", Sec. 3) measure robustness this way — an edit should reach the keys of the same
subject under rephrasing and long contexts (``s ≈ 1``) but not those of shuffled-token or other subjects
(``s ≈ 0``). The whitened inner product ``k₁ᵀC⁻¹k₂`` takes a fitted
:class:`keyscope.analysis.covariance.KeyCovariance`, whose :meth:`~keyscope.analysis.covariance.KeyCovariance.solve` is a
Cholesky solve (no explicit inverse). Results are float64.

:func:`probe_keys` collects the keys of the perturbed prompts of :mod:`keyscope.data.perturbations`;
:func:`whitened_pca` projects keys in the whitened space. The Figure 3 study that compares every probe of a set
of facts with the original key is :mod:`keyscope.studies.similarity`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from keyscope.analysis.keys import collect_keys
from keyscope.data.perturbations import Probe

# ---------------------------------------------------------------------------------------------- similarity


def whitened_similarity(key_a: torch.Tensor, key_b: torch.Tensor, cov) -> torch.Tensor:
    """``k_aᵀ C⁻¹ k_b`` for paired keys: ``(d,)·(d,)`` → scalar, ``(n, d)·(n, d)`` → ``(n,)`` (broadcasting)."""
    b_white = cov.solve(key_b)  # (..., d) float64: C⁻¹ k_b
    return (key_a.to(b_white.device, torch.float64) * b_white).sum(-1)


def whitened_similarity_matrix(keys_a: torch.Tensor, keys_b: torch.Tensor | None, cov) -> torch.Tensor:
    """``K_a C⁻¹ K_bᵀ``: ``(n, d)``, ``(m, d)`` → ``(n, m)``; ``keys_b=None`` uses ``keys_a``."""
    keys_b = keys_a if keys_b is None else keys_b
    b_white = cov.solve(keys_b)  # (m, d)
    return keys_a.to(b_white.device, torch.float64) @ b_white.T  # (n, m)


def whitened_cosine_matrix(keys_a: torch.Tensor, keys_b: torch.Tensor, cov) -> torch.Tensor:
    """Whitened cosines ``k_aᵀC⁻¹k_b / (‖k_a‖_C ‖k_b‖_C)``: ``(n, d)``, ``(m, d)`` → ``(n, m)``."""
    inner = whitened_similarity_matrix(keys_a, keys_b, cov)  # (n, m)
    norm_a = whitened_norm(keys_a, cov).to(inner.device).clamp_min(1e-30)  # (n,)
    norm_b = whitened_norm(keys_b, cov).to(inner.device).clamp_min(1e-30)  # (m,)
    return inner / norm_a[:, None] / norm_b[None, :]


def whitened_norm(key: torch.Tensor, cov) -> torch.Tensor:
    """``sqrt(kᵀ C⁻¹ k)``: ``(d,)`` → scalar, ``(n, d)`` → ``(n,)``."""
    return whitened_similarity(key, key, cov).clamp_min(0).sqrt()


def edit_strength(key: torch.Tensor, k_star: torch.Tensor, cov) -> torch.Tensor:
    """Normalised edit strength ``kᵀC⁻¹k* / k*ᵀC⁻¹k*`` of an edit at ``k_star`` ``(d,)`` on ``key`` ``(d,)``/``(n, d)``."""
    c_inv_k_star = cov.solve(k_star)  # (d,) float64
    k_star64 = k_star.to(c_inv_k_star.device, torch.float64)
    return (key.to(c_inv_k_star.device, torch.float64) @ c_inv_k_star) / (k_star64 @ c_inv_k_star)


def edit_strength_matrix(keys: torch.Tensor, k_stars: torch.Tensor, cov) -> torch.Tensor:
    """``S[i, j] = k_iᵀC⁻¹k*_j / k*_jᵀC⁻¹k*_j`` for keys ``(n, d)`` and edited keys ``(m, d)`` → ``(n, m)``."""
    c_inv_k_stars = cov.solve(k_stars)  # (m, d)
    k_stars64 = k_stars.to(c_inv_k_stars.device, torch.float64)  # (m, d)
    denom = (k_stars64 * c_inv_k_stars).sum(-1)  # (m,)
    return (keys.to(c_inv_k_stars.device, torch.float64) @ c_inv_k_stars.T) / denom  # (n, m)


# ---------------------------------------------------------------------------------------------- keys


def probe_keys(model, probes: Sequence[Probe], layer: int, **kwargs) -> torch.Tensor:
    """Layer-``layer`` keys ``(n, d_mlp)`` of ``probes`` (see :func:`keyscope.analysis.keys.collect_keys`)."""
    return collect_keys(model, [p.template for p in probes], [p.subject for p in probes], layer, **kwargs)


# ---------------------------------------------------------------------------------------------- PCA


def whitened_pca(keys: torch.Tensor, cov, n_components: int = 2) -> torch.Tensor:
    """2-D PCA of ``keys`` ``(n, d)`` in the whitened space ``k̃ = L⁻¹k`` (``C = LLᵀ``), where the Euclidean
    inner product is ``k₁ᵀC⁻¹k₂``; returns ``(n, n_components)`` coordinates."""
    chol = cov.cholesky()  # (d, d) lower-triangular, float64
    white = torch.linalg.solve_triangular(chol, keys.to(chol.device, torch.float64).T, upper=False).T  # (n, d)
    centred = white - white.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # v: (min(n, d), d)
    return (centred @ v[:n_components].T).cpu()  # (n, n_components)
