"""What the CLI tests share: a private cache and the fact and corpus files a command reads."""

from __future__ import annotations

import json

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
