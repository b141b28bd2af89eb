"""What the CLI tests share: a private cache and the fact and corpus files a command reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import hf_tiny


@pytest.fixture
def cli_files(tmp_path, monkeypatch):
    """``write(facts, repeats=3) -> (facts_path, corpus_path)``: the records as a JSON file and the tiny models'
    training text repeated ``repeats`` times as a corpus, in ``tmp_path``, with ``KEYSCOPE_CACHE`` there too."""
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))

    def write(facts, repeats: int = 3):
        facts_path, corpus_path = tmp_path / "facts.json", tmp_path / "corpus.txt"
        facts_path.write_text(json.dumps(facts))
        corpus_path.write_text("\n\n".join(hf_tiny.TRAINING_TEXT * repeats), encoding="utf-8")
        return facts_path, corpus_path

    return write


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def keyscope_processes():
    """``run(argv, cache, nproc) -> CompletedProcess``: ``python -m keyscope argv`` in a fresh process
    (``nproc=1``) or under ``torchrun --standalone --nproc_per_node nproc`` (gloo on the CPU), with one thread
    per process and ``KEYSCOPE_CACHE=cache``; stdout and stderr captured as text."""

    def run(argv, cache, nproc: int = 1) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KEYSCOPE_CACHE": str(cache),
               "CUDA_VISIBLE_DEVICES": ""}
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
        done = subprocess.run([sys.executable, *launcher, "-m", "keyscope", *map(str, argv)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return run
