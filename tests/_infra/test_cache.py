from __future__ import annotations

import json
import warnings

import pytest
import torch

from keyscope._infra import cache
from keyscope._infra.errors import CorruptCache

SPEC = {"model": "tiny", "layer": 1, "n_tokens": 100, "excluded": ["bos", "padding"]}


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {"C": torch.arange(12.0, dtype=torch.float64).reshape(3, 4), "n": torch.tensor(7)}


def _assert_payload(tensors):
    assert torch.equal(tensors["C"], torch.arange(12.0, dtype=torch.float64).reshape(3, 4))
    assert int(tensors["n"]) == 7


def test_roundtrip_layout_and_hit(tmp_path):
    compute = Counter()
    _assert_payload(cache.cached("cov", SPEC, compute, root=tmp_path))
    _assert_payload(cache.cached("cov", SPEC, compute, root=tmp_path))
    assert compute.calls == 1
    folder = cache.artefact_dir("cov", SPEC, tmp_path)
    assert folder.parent.name == "cov" and folder.name == cache.spec_hash(SPEC)
    record = json.loads((folder / cache.SPEC).read_text())
    assert record["spec"] == SPEC and len(record["sha256"]) == 64
    assert record["bytes"] == (folder / cache.TENSORS).stat().st_size
    assert sorted(p.name for p in folder.iterdir()) == sorted([cache.SPEC, cache.TENSORS]), "no temp files left"


def test_spec_hash_is_order_independent_and_distinguishes_specs():
    assert cache.spec_hash({"a": 1, "b": 2}) == cache.spec_hash({"b": 2, "a": 1})
    assert cache.spec_hash({"a": 1}) != cache.spec_hash({"a": 2})
    with pytest.raises(TypeError):
        cache.spec_hash({"a": object()})


def test_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "env"))
    assert cache.cache_root() == tmp_path / "env"
    cache.cached("cov", SPEC, Counter())
    assert (tmp_path / "env" / "cov" / cache.spec_hash(SPEC) / cache.SPEC).exists()
    monkeypatch.delenv("KEYSCOPE_CACHE")
    assert cache.cache_root().parts[-2:] == (".cache", "keyscope")


def _corrupt_truncate(folder):
    path = folder / cache.TENSORS
    path.write_bytes(path.read_bytes()[:-10])


def _corrupt_flip(folder):
    path = folder / cache.TENSORS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))


def _corrupt_spec(folder):
    path = folder / cache.SPEC
    record = json.loads(path.read_text())
    record["spec"]["layer"] = 2
    path.write_text(json.dumps(record))


def _corrupt_json(folder):
    (folder / cache.SPEC).write_text("{not json")


def _corrupt_interrupted(folder):
    (folder / cache.SPEC).unlink()


def _corrupt_missing_file(folder):
    (folder / cache.TENSORS).unlink()


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_truncate, _corrupt_flip, _corrupt_spec, _corrupt_json, _corrupt_interrupted, _corrupt_missing_file],
)
def test_corrupt_cache_is_detected_and_recomputed(tmp_path, corrupt):
    compute = Counter()
    cache.cached("cov", SPEC, compute, root=tmp_path)
    folder = cache.artefact_dir("cov", SPEC, tmp_path)
    corrupt(folder)
    with pytest.raises(CorruptCache) as info:
        cache.load("cov", SPEC, tmp_path)
    assert "\n" not in str(info.value)
    with pytest.warns(UserWarning, match="recomputing"):
        _assert_payload(cache.cached("cov", SPEC, compute, root=tmp_path))
    assert compute.calls == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: loads silently
        _assert_payload(cache.cached("cov", SPEC, compute, root=tmp_path))
    assert compute.calls == 2


def test_recompute_switch_and_missing(tmp_path):
    compute = Counter()
    with pytest.raises(FileNotFoundError):
        cache.load("cov", SPEC, tmp_path)
    cache.cached("cov", SPEC, compute, root=tmp_path)
    cache.cached("cov", SPEC, compute, recompute=True, root=tmp_path)
    assert compute.calls == 2


def test_unwritable_root_warns_and_returns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    compute = Counter()
    with pytest.warns(UserWarning, match="not cached"):
        _assert_payload(cache.cached("cov", SPEC, compute, root=blocker))
