from __future__ import annotations

import pytest
import torch

from keyscope import distributed
from keyscope.distributed import World


def test_from_env_reads_torchrun_variables():
    assert distributed.from_env({}) == distributed.SINGLE
    world = distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert world == World(rank=3, size=4, local_rank=1) and world.distributed and not world.is_main
    assert distributed.from_env({"RANK": "0", "WORLD_SIZE": "1"}).is_main
    with pytest.raises(ValueError, match="outside"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_shards_partition_the_stream():
    items = list("abcdefghij")
    shards = [list(distributed.shard(items, World(rank=r, size=3))) for r in range(3)]
    assert shards[1] == [(1, "b"), (4, "e"), (7, "h")]
    assert sorted(i for part in shards for i, _ in part) == list(range(10))
    assert list(distributed.shard(items, World(rank=1, size=3), start=5)) == [(7, "h")]


def test_single_process_helpers_are_no_ops():
    t = torch.ones(3)
    distributed.all_reduce_sum_([t], distributed.SINGLE)
    assert t.tolist() == [1.0, 1.0, 1.0]
    assert distributed.broadcast_object({"a": 1}, distributed.SINGLE) == {"a": 1}
    assert distributed.all_gather_object({"a": 1}, distributed.SINGLE) == [{"a": 1}]
    assert distributed.device_for(distributed.SINGLE, "cpu") == "cpu"
    with distributed.process_group(distributed.SINGLE, "cpu") as world:
        assert world is distributed.SINGLE and not torch.distributed.is_initialized()
