from __future__ import annotations

import pytest

from tests import hf_tiny


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """One tiny random checkpoint per architecture, saved once per test session: {arch: path}."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {arch: hf_tiny.save_tiny_checkpoint(arch, root / arch) for arch in hf_tiny.ARCHITECTURES}
