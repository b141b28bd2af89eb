"""keyscope.analysis.stats: the key covariance and the scan's running top-k are one kind of running statistic.

The same generic check runs on both: fold a stream in chunks, or in shards merged afterwards (through a saved and
restored state), and get the statistic of the whole stream; ``all_reduce`` is a no-op for a single process.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from keyscope._infra.distributed import SINGLE
from keyscope.analysis.covariance import KeyCovariance
from keyscope.analysis.scan import ScoreTopK
from keyscope.analysis.stats import RunningStat

N, D, S, K = 90, 12, 3, 5
PROTOCOL = ("add", "merge", "state_dict", "load_state_dict", "all_reduce")


def _stream():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(N, D, generator=g)  # (N, D)
    excluded = torch.rand(N, S, generator=g) < 0.2  # (N, S)
    prefix = torch.arange(N)[:, None].expand(N, 2)  # (N, 2)
    return keys, excluded, prefix


def _covariance():
    return KeyCovariance(0, progress=False)


def _top_k():
    W = torch.randn(D, S, generator=torch.Generator().manual_seed(1))
    return ScoreTopK(lambda keys: keys @ W, S, K, prefix_tokens=2, thresholds=torch.zeros(S))


def _add(stat, lo: int, hi: int) -> None:
    keys, excluded, prefix = _stream()
    if isinstance(stat, KeyCovariance):
        stat.add(keys[lo:hi])
    else:
        stat.add(keys[lo:hi], excluded[lo:hi], torch.arange(lo, hi), prefix[lo:hi])


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if isinstance(a, KeyCovariance):
        # float32 Gram products of different chunks: equal to float32 rounding
        return sa["n_tokens"] == sb["n_tokens"] and torch.allclose(sa["sum"], sb["sum"], rtol=1e-6, atol=1e-6)
    return all(torch.equal(sa[key], sb[key]) for key in sa)


@pytest.mark.parametrize("make", [_covariance, _top_k], ids=["KeyCovariance", "ScoreTopK"])
def test_both_estimates_are_one_running_statistic(make):
    stat = make()
    assert isinstance(stat, RunningStat)
    for name in PROTOCOL:
        assert callable(getattr(stat, name))
    # the protocol's own parameters come first, under the protocol's names (extras are optional)
    for name in ("merge", "load_state_dict", "all_reduce"):
        params = list(inspect.signature(getattr(stat, name)).parameters.values())
        ours = list(inspect.signature(getattr(RunningStat, name)).parameters)[1:]
        assert [p.name for p in params[: len(ours)]] == ours
        assert all(p.default is not inspect.Parameter.empty for p in params[len(ours):])

    whole = make()
    for lo in range(0, N, 7):
        _add(whole, lo, min(lo + 7, N))
    shards = [make() for _ in range(3)]
    for i, lo in enumerate(range(0, N, 10)):
        _add(shards[i % 3], lo, lo + 10)
    merged = make()
    for shard in shards:
        merged.merge(make().load_state_dict(shard.state_dict()))
    assert _same(merged, whole)
    assert merged.all_reduce(SINGLE) is merged and _same(merged, whole)
    saved = whole.state_dict()
    _add(whole, 0, 5)  # the saved state is a copy
    assert _same(make().load_state_dict(saved), merged)
