"""Several processes on one job with ``torch.distributed``, launched by ``torchrun``.

keyscope does not launch processes itself: ``torchrun --nproc_per_node K -m keyscope covariance|scan|evaluate …`` (or
torchrun's multi-node flags) starts ``K`` copies and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in each one's environment. :func:`from_env` reads them and
:func:`process_group` initialises the default process group — NCCL when the processes use CUDA devices,
gloo on CPUs — and destroys it on exit. Without torchrun's variables everything here is a single process
(``World(rank=0, size=1)``) and no process group is created.

Work is split by deterministic striding (:func:`shard`): rank ``r`` of ``size`` takes items
``r, r + size, r + 2·size, …`` of a stream every rank generates identically, so the union of the shards is
the stream and no two ranks share an item. Partial results are combined with :func:`all_reduce_sum_`
(float64 sums and int64 counts, so the sum is the single-process one up to the order of float64 additions)
and :func:`broadcast_object` (rank 0's decisions), or gathered with :func:`all_gather_object` (each rank's
top-k lists or per-fact rows, merged in a fixed order); only rank 0 writes files (:attr:`World.is_main`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class World:
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


SINGLE = World()


def from_env(environ=None) -> World:
    """The :class:`World` torchrun describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (single process
    when they are absent)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return SINGLE
    size = int(env["WORLD_SIZE"])
    rank = int(env["RANK"])
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=int(env.get("LOCAL_RANK", rank)))


def device_for(world: World, device: str | None = None) -> str:
    """The device this rank computes on: ``device`` if given, else ``cuda:LOCAL_RANK`` when CUDA is available
    (one GPU per process, as torchrun's ``--nproc_per_node`` assumes), else the CPU."""
    if device is not None:
        return device
    if torch.cuda.is_available():
        return f"cuda:{world.local_rank % torch.cuda.device_count()}"
    return "cpu"


@contextmanager
def process_group(world: World, device: str) -> Iterator[World]:
    """Initialise the default process group for ``world`` (NCCL on CUDA, gloo otherwise) and destroy it on exit.

    A single-process world, or one whose group is already initialised by the caller, is left alone.
    """
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        yield world
        return
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def shard(items: Iterable[T], world: World, start: int = 0) -> Iterator[tuple[int, T]]:
    """``(index, item)`` for this rank's items of ``items``: the indices ``i ≥ start`` with ``i % size == rank``.

    Every rank must iterate the same stream; the items of the other ranks are skipped, not computed on.
    """
    for index, item in enumerate(items):
        if index >= start and index % world.size == world.rank:
            yield index, item


def all_reduce_sum_(tensors: Iterable[torch.Tensor], world: World) -> None:
    """Sum each tensor over all ranks, in place (a no-op for a single process)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_min(value: int, world: World, device: str = "cpu") -> int:
    """The smallest of the ranks' integer ``value`` (``value`` itself for a single process); ``device`` is where
    the collective's tensor lives (a CUDA device under NCCL)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    return int(box.item())


def broadcast_object(value: T, world: World) -> T:
    """Rank 0's ``value`` on every rank (pickled; for small decisions such as which layers to compute)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_gather_object(value: T, world: World) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank (pickled; ``[value]`` for a single process)."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered
