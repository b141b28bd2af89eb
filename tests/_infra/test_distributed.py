from __future__ import annotations

import pytest
import torch

from keyscope._infra import distributed
from keyscope._infra.distributed import ProcessRank
from keyscope._infra.errors import KeyscopeError, RankFailed


def test_from_env_reads_torchrun_variables():
    assert distributed.from_env({}) == distributed.SINGLE
    world = distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert world == ProcessRank(rank=3, size=4, local_rank=1) and world.distributed and not world.is_main
    assert distributed.from_env({"RANK": "0", "WORLD_SIZE": "1"}).is_main
    with pytest.raises(ValueError, match="outside"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_shards_partition_the_stream():
    items = list("abcdefghij")
    shards = [list(distributed.shard(items, ProcessRank(rank=r, size=3))) for r in range(3)]
    assert shards[1] == [(1, "b"), (4, "e"), (7, "h")]
    assert sorted(i for part in shards for i, _ in part) == list(range(10))
    assert list(distributed.shard(items, ProcessRank(rank=1, size=3), start=5)) == [(7, "h")]


def test_single_process_helpers_are_no_ops():
    t = torch.ones(3)
    distributed.all_reduce_sum_([t], distributed.SINGLE)
    assert t.tolist() == [1.0, 1.0, 1.0]
    assert distributed.broadcast_object({"a": 1}, distributed.SINGLE) == {"a": 1}
    assert distributed.all_gather_object({"a": 1}, distributed.SINGLE) == [{"a": 1}]
    assert distributed.device_for(distributed.SINGLE, "cpu") == "cpu"
    with distributed.process_group(distributed.SINGLE, "cpu") as world:
        assert world is distributed.SINGLE and not torch.distributed.is_initialized()


def test_timeout_and_exit_status():
    assert distributed.timeout_from_env({}) == distributed.DEFAULT_TIMEOUT_S
    assert distributed.timeout_from_env({"KEYSCOPE_DIST_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(KeyscopeError, match="KEYSCOPE_DIST_TIMEOUT"):
            distributed.timeout_from_env({"KEYSCOPE_DIST_TIMEOUT": bad})
    assert [distributed.exit_status(e) for e in (KeyscopeError("x"), RankFailed("x", exit_code=1), OSError("x"),
                                                  KeyboardInterrupt(), RuntimeError("x"))] == [2, 1, 2, 130, 1]
    distributed.check_peers(distributed.SINGLE)  # no group: nothing to exchange


def _rank_main(rank: int, port: int, folder: str, case: str) -> None:
    """One of two gloo processes under a 2 s timeout. ``late``: rank 1 comes to the gather 4 s late; ``shard``:
    rank 1 fails at its second item of a long sharded stream. Each rank writes what it saw into ``folder``."""
    import os
    import time
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = ProcessRank(rank=rank, size=2)
    seen, index = "gathered", -1
    try:
        with distributed.process_group(world, "cpu", timeout=2.0):
            if case == "late" and rank == 1:
                time.sleep(4)  # a rank stuck in its own work, past the others' 2 s wait
            if case == "shard":
                for index, _ in distributed.shard(range(100_000), world):
                    if rank == 1 and index == 3:
                        raise RuntimeError("rank 1's shard")
            distributed.all_gather_object(rank, world)
    except RankFailed as exc:
        seen = f"{exc.exit_code} {exc}"
    except RuntimeError as exc:
        seen = f"own {exc}"
    Path(folder, f"rank{rank}").write_text(f"{index} {seen}")


@pytest.mark.slow
@pytest.mark.parametrize("case, seen", [
    ("late", "-1 1 a collective failed"),  # rank 0's gather fails after its 2 s wait, naming the timeout
    ("shard", "30 1 stopped because rank 1 of 2 failed"),  # its last item before the first heartbeat
])
def test_a_failing_or_missing_rank_stops_the_other(tmp_path, case, seen):
    """A genuine hang is bounded by the process group's timeout (not gloo's default 30 minutes); a rank that
    fails in a long sharded loop stops the others at the loop's next heartbeat (``HEARTBEAT_ITEMS · size`` = 32
    stream items), where it reports its status (tests/cli/test_covariance.py has a failure before a collective
    and one after the work, through the CLI)."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.monotonic()
    mp.spawn(_rank_main, args=(port, str(tmp_path), case), nprocs=2, join=True)
    assert time.monotonic() - began < 60
    assert (tmp_path / "rank0").read_text().startswith(seen), (tmp_path / "rank0").read_text()
    if case == "late":
        assert "within 2 s (KEYSCOPE_DIST_TIMEOUT)" in (tmp_path / "rank0").read_text()
    else:
        assert (tmp_path / "rank1").read_text() == "3 own rank 1's shard"
