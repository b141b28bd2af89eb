from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from keyscope._infra import memory
from keyscope.analysis.covariance import KeyCovariance
from keyscope.model.models import load_model
from tests import hf_tiny


def test_fit_batch_size_is_the_windows_that_fit_capped():
    GiB = 2**30
    assert memory.fit_batch_size(80 * GiB, GiB, cap=512) == 40  # half of 80 GiB in 1 GiB windows
    assert memory.fit_batch_size(80 * GiB, GiB, cap=16) == 16  # the user's --batch-size caps it
    assert memory.fit_batch_size(80 * GiB, GiB, cap=512, fraction=0.25) == 20
    assert memory.fit_batch_size(GiB, 3 * GiB, cap=8) == 1  # never below one window
    assert memory.fit_batch_size(0, 10, cap=8) == 1
    for bad in ({"cap": 0}, {"bytes_per_window": 0}, {"fraction": 0.0}, {"fraction": 1.5}):
        with pytest.raises(ValueError):
            memory.fit_batch_size(**{"free_bytes": GiB, "bytes_per_window": 10, "cap": 4, **bad})


def _fake_model(device: str, d_model=64, d_mlp=256, n_heads=4, dtype=torch.bfloat16):
    weights = torch.nn.Linear(2, 2).to(dtype)
    return SimpleNamespace(cfg=SimpleNamespace(device=device, d_model=d_model, d_mlp=d_mlp, n_heads=n_heads),
                           original_model=weights)


def test_window_bytes_counts_one_block_and_the_captured_keys():
    model = _fake_model("cpu")
    seq = 32
    live = 2 * 2 * seq * (6 * 64 + 2 * 256 + 4 * seq)  # bf16: 2 bytes
    assert memory.window_bytes(model, seq, [3]) == live + 4 * seq * 256
    assert memory.window_bytes(model, seq, [3, 5, 5]) == live + 2 * 4 * seq * 256
    assert memory.window_bytes(model, 2 * seq, [3]) > 2 * memory.window_bytes(model, seq, [3])  # scores grow as seq²


def test_cpu_keeps_the_requested_batch_size_and_cuda_fills_free_memory(monkeypatch):
    assert memory.corpus_batch_size(_fake_model("cpu"), 256, [1]) == memory.DEFAULT_BATCH_SIZE
    assert memory.corpus_batch_size(_fake_model("cpu"), 256, [1], requested=3) == 3
    cuda = _fake_model("cuda:0")
    per_window = memory.window_bytes(cuda, 256, [1])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000 * per_window, 4000 * per_window))
    assert memory.corpus_batch_size(cuda, 256, [1]) == 500  # half of 1000 windows' worth of free memory
    assert memory.corpus_batch_size(cuda, 256, [1], requested=64) == 64  # --batch-size caps it
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**6 * per_window, 10**7 * per_window))
    assert memory.corpus_batch_size(cuda, 256, [1]) == memory.MAX_BATCH_SIZE


def test_batch_size_changes_C_by_float_rounding_only(tmp_path):
    model = load_model(str(hf_tiny.save_tiny_checkpoint("gpt2", tmp_path / "gpt2")))
    Cs = [KeyCovariance(1, n_tokens=500, seq_len=24, batch_size=b, progress=False).fit(model, hf_tiny.TRAINING_TEXT)
          for b in (1, 3, 16)]
    assert len({c.n_tokens_ for c in Cs}) == 1
    for C in Cs[1:]:
        assert float((C.C_ - Cs[0].C_).abs().max() / Cs[0].C_.abs().max()) <= 1e-6
