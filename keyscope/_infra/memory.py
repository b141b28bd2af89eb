"""How many corpus windows one forward pass takes: the batch size of corpus passes from free device memory.

On a CUDA device :func:`corpus_batch_size` fills a share of the free memory (``torch.cuda.mem_get_info``) with
windows, each costing :func:`window_bytes`, capped by the user's ``--batch-size`` when given
(:func:`fit_batch_size`, pure arithmetic). On the CPU the batch size is the requested one (default 16), so CPU
results never change. The batch size decides only how windows are grouped into forward passes: the windows,
their order and what is counted are those of :func:`keyscope.data.corpus.token_batches` whatever it is, so a
different batch size changes ``C`` and scan scores by float rounding only (batched matmuls and the order of the
float64 additions of ``C``'s per-batch Gram blocks), never which tokens count. Under ``torchrun`` every rank
takes the smallest of the ranks' choices, so all cut the stream into the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from keyscope._infra.distributed import SINGLE, ProcessRank, all_reduce_min

#: Batch size of corpus passes when none is asked for, on the CPU (and the cap on CUDA).
DEFAULT_BATCH_SIZE = 16
MAX_BATCH_SIZE = 512
#: Share of the free device memory the windows of one batch may take (the rest: fragmentation, the
#: allocator's cache, the scores and Gram blocks of the pass).
MEMORY_FRACTION = 0.5


def fit_batch_size(free_bytes: int, bytes_per_window: int, cap: int, fraction: float = MEMORY_FRACTION) -> int:
    """``min(cap, ⌊fraction · free_bytes / bytes_per_window⌋)``, at least 1: the windows that fit in ``fraction``
    of ``free_bytes``, never more than ``cap``."""
    if cap < 1:
        raise ValueError(f"cap must be positive, not {cap}")
    if bytes_per_window < 1:
        raise ValueError(f"bytes_per_window must be positive, not {bytes_per_window}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], not {fraction}")
    return max(1, min(cap, int(fraction * max(free_bytes, 0) // bytes_per_window)))


def window_bytes(model, seq_len: int, layers: Sequence[int]) -> int:
    """An upper estimate of the activation memory of one window of ``seq_len`` tokens in a no-grad forward pass
    stopped after the highest of ``layers``, with their keys captured.

    Per layer only one block's activations are alive: the residual stream and its normed copy, queries, keys,
    values and the attention output (``6·d_model``), one ``(n_heads, seq, seq)`` score matrix (the eager path;
    SDPA needs less) and the MLP's pre- and post-activation (``2·d_mlp``), in the weights' dtype, twice over for
    the temporaries of each operation; plus each captured layer's keys in float32 (:mod:`keyscope.analysis.covariance`
    and :mod:`keyscope.analysis.scan` score them in float32).
    """
    cfg = model.cfg
    element = next(model.original_model.parameters()).element_size()
    per_token = 6 * int(cfg.d_model) + 2 * int(cfg.d_mlp) + int(cfg.n_heads) * seq_len  # (seq, ·) of one block
    live = 2 * element * seq_len * per_token
    captured = 4 * seq_len * int(cfg.d_mlp) * len(set(layers))
    return live + captured


def corpus_batch_size(model, seq_len: int, layers: Sequence[int], requested: int | None = None,
                      world: ProcessRank = SINGLE) -> int:
    """The batch size of a corpus pass of ``model`` (module docstring): ``requested`` (or
    :data:`DEFAULT_BATCH_SIZE`) on the CPU; on CUDA what fits in the free memory, at most ``requested`` (or
    :data:`MAX_BATCH_SIZE`), the same on every rank of ``world``."""
    device = torch.device(model.cfg.device)
    if device.type != "cuda":
        return requested or DEFAULT_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(device)
    size = fit_batch_size(free, window_bytes(model, seq_len, layers), requested or MAX_BATCH_SIZE)
    return all_reduce_min(size, world, device)
