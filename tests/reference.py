"""Independent dense references for the tests: keys read off a full, unpadded forward pass of one sequence
(``run_with_cache``, no batching, no early stop, no prompt helpers of keyscope) and edit strengths solved
in numpy, so that library results can be checked against numbers computed another way."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from keyscope.model.models import key_hook


def dense_keys(model, ids: Sequence[int], layer: int) -> np.ndarray:
    """The layer-``layer`` keys ``(len(ids), d_mlp)`` of one token sequence, in float64."""
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([list(ids)], device=model.cfg.device))
    return cache[key_hook(layer)][0].double().cpu().numpy()


def dense_key(model, template: str, subject: str, layer: int) -> np.ndarray:
    """The key ``(d_mlp,)`` at the last token overlapping the subject's slot of ``template`` (one ``{}``)."""
    start = template.index("{}")
    text = template[:start] + subject + template[start + 2 :]
    enc = model.tokenizer(text, return_offsets_mapping=True)
    end = start + len(subject)
    last = max(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start)
    return dense_keys(model, enc["input_ids"], layer)[last]


def dense_strength(keys: np.ndarray, k_star: np.ndarray, cov) -> np.ndarray:
    """``kᵀC⁻¹k* / k*ᵀC⁻¹k*`` with ``C`` the fitted covariance plus its ridge, solved densely in numpy."""
    C = cov.C_.double().cpu().numpy() + cov.ridge_ * np.eye(cov.C_.shape[0])
    c_inv_k_star = np.linalg.solve(C, k_star)
    return keys @ c_inv_k_star / (k_star @ c_inv_k_star)
