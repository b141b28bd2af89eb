"""Running statistics: the one protocol of keyscope's streaming estimates.

A statistic of a corpus is never held as the corpus's activations: batches are folded into a fixed-size state as
they stream past, shards of the stream (checkpoints, ``torchrun`` ranks) are combined, and the state is saved and
restored exactly. Two estimates do this — the key covariance (:class:`keyscope.analysis.covariance.KeyCovariance`, a running
``Σ k kᵀ`` and count) and the scan's running top-k (:class:`keyscope.analysis.scan.ScoreTopK`) — and both implement
:class:`RunningStat`, so a job streams, checkpoints and reduces either the same way.

The protocol is baukit's ``runningstats`` (davidbau/baukit, ``baukit/runningstats.py``: ``class Stat`` l. 145,
``add`` l. 157, ``load_state_dict`` l. 165, ``state_dict`` l. 172: "Feed it batches via the add method"), with
the two operations a sharded stream needs on top: ``merge`` (another shard's state into this one) and
``all_reduce`` (every rank's, over :mod:`keyscope._infra.distributed`).
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

from keyscope._infra.distributed import ProcessRank

S = TypeVar("S", bound="RunningStat")


@runtime_checkable
class RunningStat(Protocol):
    """A streaming statistic: fold batches in, combine shards, save and restore the raw state exactly.

    * ``add(batch, …)`` folds one batch into the state (what a batch is depends on the statistic: keys
      ``(n, d_mlp)`` for the covariance, a scored chunk for the top-k); returns the statistic.
    * ``merge(other)`` folds another statistic of the same kind (another shard of the stream) into this one; the
      result is that of one statistic that saw both streams (up to float rounding of a sum's order); returns self.
    * ``state_dict()`` is the raw state as plain tensors and numbers (a copy, on the CPU), and
      ``load_state_dict(state)`` restores it into a fresh instance exactly; returns self.
    * ``all_reduce(world)`` makes every rank of ``world`` hold the statistic of the union of their streams (a no-op
      for a single process); returns self.
    """

    def add(self, *batch: Any, **kwargs: Any) -> Any: ...

    def merge(self: S, other: S) -> S: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self: S, state: dict[str, Any]) -> S: ...

    def all_reduce(self: S, world: ProcessRank) -> S: ...
