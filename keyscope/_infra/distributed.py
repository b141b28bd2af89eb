"""Several processes on one job with ``torch.distributed``, launched by ``torchrun``.

keyscope does not launch processes itself: ``torchrun --nproc_per_node K -m keyscope covariance|scan|evaluate …`` (or
torchrun's multi-node flags) starts ``K`` copies and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in each one's environment. :func:`from_env` reads them and
:func:`process_group` initialises the default process group — NCCL when the processes use CUDA devices,
gloo on CPUs — and destroys it on exit. Without torchrun's variables everything here is a single process
(``ProcessRank(rank=0, size=1)``) and no process group is created.

Work is split by deterministic striding (:func:`shard`): rank ``r`` of ``size`` takes items
``r, r + size, r + 2·size, …`` of a stream every rank generates identically, so the union of the shards is
the stream and no two ranks share an item. Partial results are combined with :func:`all_reduce_sum_`
(float64 sums and int64 counts, so the sum is the single-process one up to the order of float64 additions)
and :func:`broadcast_object` (rank 0's decisions), or gathered with :func:`all_gather_object` (each rank's
top-k lists or per-fact rows, merged in a fixed order); only rank 0 writes files (:attr:`ProcessRank.is_main`).

**A failure on one rank ends every rank.** Inside :func:`process_group` every collective of this module first
exchanges one status per rank (a small ``all_reduce``, :func:`check_peers`): 0 for "fine". A rank whose own
work raises (any exception, a :class:`~keyscope._infra.errors.KeyscopeError` or a bug) does not skip that exchange:
on its way out of :func:`process_group` it joins it with its exit status (2 for a ``KeyscopeError``, 1 for an
unexpected exception, 130 for Ctrl-C), so the other ranks, at their next collective (at the latest the
exchange at the end of the block), raise :class:`~keyscope._infra.errors.RankFailed` naming the rank instead of
waiting for data that will never come; long loops over a stream exchange statuses every few items too
(:func:`heartbeat`). Every rank then meets once more (after its ``finally`` blocks ran, so
rank 0 has removed its partial outputs before any rank exits and ``torchrun`` stops the rest) and re-raises.
An error inside a collective itself (a rank that died, or a wait past the process group's ``timeout``) is a
:class:`~keyscope._infra.errors.RankFailed` too, after which no further exchange is tried. The timeout only bounds how
long one rank waits for the others at a collective; it never changes a result.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from keyscope._infra.errors import KeyscopeError, RankFailed, exit_status

T = TypeVar("T")

#: Seconds one rank waits for the others at a collective before the job fails (``KEYSCOPE_DIST_TIMEOUT``
#: overrides it; gloo's own default is 30 minutes). Rank 0 reading or writing large caches while the others
#: wait is the longest legitimate wait.
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ProcessRank:
    """This process's place among ``size`` processes: ``rank`` (global) and ``local_rank`` (on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes caches, figures and JSON (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = ProcessRank()


def from_env(environ=None) -> ProcessRank:
    """The :class:`ProcessRank` torchrun describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (single process
    when they are absent)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return SINGLE
    size = int(env["WORLD_SIZE"])
    rank = int(env["RANK"])
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return ProcessRank(rank=rank, size=size, local_rank=int(env.get("LOCAL_RANK", rank)))


def device_for(world: ProcessRank, device: str | None = None) -> str:
    """The device this rank computes on: ``device`` if given, else ``cuda:LOCAL_RANK`` when CUDA is available
    (one GPU per process, as torchrun's ``--nproc_per_node`` assumes), else the CPU."""
    if device is not None:
        return device
    if torch.cuda.is_available():
        return f"cuda:{world.local_rank % torch.cuda.device_count()}"
    return "cpu"


def timeout_from_env(environ=None) -> float:
    """The process group's timeout in seconds: ``KEYSCOPE_DIST_TIMEOUT`` if set, else :data:`DEFAULT_TIMEOUT_S`."""
    env = os.environ if environ is None else environ
    text = env.get("KEYSCOPE_DIST_TIMEOUT")
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise KeyscopeError(f"KEYSCOPE_DIST_TIMEOUT must be a positive number of seconds, not {text!r}")
    return seconds


@dataclass
class _Guard:
    """The failure exchange of the process group :func:`process_group` opened: where its status tensor lives,
    and whether a collective broke (after which no rank can be reached)."""

    world: ProcessRank
    device: str
    timeout: float
    broken: bool = False
    heard: bool = False  # this rank learned of another's failure (and so joined that exchange already)
    generation: int = 0  # how many groups this process opened before: a fresh store key for each exit barrier


#: The guard of the open :func:`process_group` (``None`` outside one, or when the caller owns the group).
_guard: _Guard | None = None
#: How many process groups :func:`process_group` opened in this process (the exit barrier's store key).
_generation = 0


@contextmanager
def _collective(guard: _Guard | None) -> Iterator[None]:
    """Around the ``torch.distributed`` calls of one collective: an error in them (a rank that died, a wait past
    the timeout) breaks the guard and is a :class:`~keyscope._infra.errors.RankFailed`."""
    try:
        yield
    except BaseException as exc:
        if guard is None:
            raise
        guard.broken = True
        if isinstance(exc, Exception) and not isinstance(exc, (KeyscopeError, RankFailed)):
            raise RankFailed(f"a collective failed ({type(exc).__name__}: {' '.join(str(exc).split()) or '?'}); "
                             f"another rank died or did not reach it within {guard.timeout:g} s "
                             f"(KEYSCOPE_DIST_TIMEOUT)", exit_code=1) from exc
        raise


def _exchange(guard: _Guard, status: int) -> list[int]:
    """Every rank's ``status`` (one small ``all_reduce``; every rank of the group must call it)."""
    import torch.distributed as dist

    box = torch.zeros(guard.world.size, dtype=torch.int64, device=guard.device)
    box[guard.world.rank] = status
    with _collective(guard):
        dist.all_reduce(box, op=dist.ReduceOp.SUM)
        return [int(s) for s in box.tolist()]


def check_peers(world: ProcessRank) -> None:
    """Raise :class:`~keyscope._infra.errors.RankFailed` if another rank of the open :func:`process_group` failed: the
    status exchange every collective here starts with (every rank must call it at the same point; a no-op for
    a single process or a group the caller opened)."""
    guard = _guard
    if not world.distributed or guard is None or guard.broken:
        return
    statuses = _exchange(guard, 0)
    failed = [rank for rank, status in enumerate(statuses) if status]
    if failed:
        guard.heard = True
        which = ", ".join(map(str, failed))
        raise RankFailed(f"stopped because rank{'s' if len(failed) > 1 else ''} {which} of {world.size} failed "
                         f"(see {'their errors' if len(failed) > 1 else 'its error'})", exit_code=statuses[failed[0]])


@contextmanager
def process_group(world: ProcessRank, device: str, timeout: float | None = None) -> Iterator[ProcessRank]:
    """Initialise the default process group for ``world`` (NCCL on CUDA, gloo otherwise) and destroy it on exit.

    ``timeout`` (seconds, default :func:`timeout_from_env`) bounds each wait at a collective. Inside the block
    a failure on any rank ends every rank (module docstring): the block's end is a last status exchange, and a
    rank leaving it with an exception of its own reports it there first. A single-process world, or one whose
    group is already initialised by the caller, is left alone.
    """
    import torch.distributed as dist

    global _guard, _generation
    if not world.distributed or dist.is_initialized():
        yield world
        return
    seconds = timeout_from_env() if timeout is None else timeout
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size, timeout=timedelta(seconds=seconds))
    _generation += 1
    guard = _guard = _Guard(world, "cuda" if backend == "nccl" else "cpu", seconds, generation=_generation)
    try:
        yield world
        check_peers(world)
    except BaseException as exc:
        if not guard.broken:
            try:
                if not guard.heard:  # this rank's own failure: the others hear of it here
                    _exchange(guard, exit_status(exc) or 1)
                _exchange(guard, 0)  # every rank has unwound (its outputs removed) before any exits
            except BaseException:  # noqa: S110 - the rank's own error is the one to report
                pass
        raise
    finally:
        _guard = None
        if not guard.broken:
            _store_barrier(world, f"keyscope-exit-{guard.generation}", seconds)
        dist.destroy_process_group()


def _store_barrier(world: ProcessRank, key: str, timeout: float) -> None:
    """Wait until every rank has reached this point (at most ``timeout`` seconds), through the process group's
    store, not a collective: no rank tears its gloo connections down while another still finishes its last
    collective on them. Without it a rank aborted at exit ("terminate called without an active exception") in
    about one two-process run in seven here (none in 24 with it). The wait decides only when a rank exits."""
    import time

    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()  # torchrun's TCPStore (private API, torch 2.x)
    store.add(key, 1)
    deadline = time.monotonic() + timeout
    while store.add(key, 0) < world.size and time.monotonic() < deadline:
        time.sleep(0.005)


#: Stream items per rank between two :func:`heartbeat` status exchanges in a long sharded loop.
HEARTBEAT_ITEMS = 16


def heartbeat(world: ProcessRank, index: int) -> None:
    """Inside a long loop over a stream every rank walks whole (:func:`shard`, the scan's batches): a status
    exchange (:func:`check_peers`) after every ``HEARTBEAT_ITEMS · size`` items of the stream, so a rank that
    failed stops the others within a few of their own items, not at the loop's end. Positions in the stream,
    not time, decide where, so every rank exchanges at the same items and no result depends on it."""
    if world.distributed and (index + 1) % (HEARTBEAT_ITEMS * world.size) == 0:
        check_peers(world)


def shard(items: Iterable[T], world: ProcessRank, start: int = 0) -> Iterator[tuple[int, T]]:
    """``(index, item)`` for this rank's items of ``items``: the indices ``i ≥ start`` with ``i % size == rank``.

    Every rank must iterate the same stream, to its end; the items of the other ranks are skipped, not computed
    on. Between items, every rank takes part in the stream's :func:`heartbeat`.
    """
    for index, item in enumerate(items):
        if index >= start and index % world.size == world.rank:
            yield index, item
        heartbeat(world, index)


def all_reduce_sum_(tensors: Iterable[torch.Tensor], world: ProcessRank) -> None:
    """Sum each tensor over all ranks, in place (a no-op for a single process)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    tensors = list(tensors)
    check_peers(world)
    with _collective(_guard):
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_min(value: int, world: ProcessRank, device: str = "cpu") -> int:
    """The smallest of the ranks' integer ``value`` (``value`` itself for a single process); ``device`` is where
    the collective's tensor lives (a CUDA device under NCCL)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = torch.tensor([value], dtype=torch.int64, device=device)
    check_peers(world)
    with _collective(_guard):
        dist.all_reduce(box, op=dist.ReduceOp.MIN)
        return int(box.item())


def broadcast_object(value: T, world: ProcessRank) -> T:
    """Rank 0's ``value`` on every rank (pickled; for small decisions such as which layers to compute)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    check_peers(world)
    with _collective(_guard):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: ProcessRank) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if world.distributed:
        import torch.distributed as dist

        check_peers(world)
        with _collective(_guard):
            dist.barrier()


def all_gather_object(value: T, world: ProcessRank) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank (pickled; ``[value]`` for a single process)."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list = [None] * world.size
    check_peers(world)
    with _collective(_guard):
        dist.all_gather_object(gathered, value)
    return gathered
