from __future__ import annotations

import math

import pytest
import torch

from keyscope._infra import cache
from keyscope._infra.distributed import SINGLE
from keyscope._infra.errors import EmptyCorpus
from keyscope.analysis.covariance import KIND, KeyCovariance, covariance_spec, load_or_compute_covariance
from keyscope.analysis.covariance_job import (
    CovarianceJob,
    checkpoint_file,
    compute_covariances,
    fit_layers,
    parse_layers,
)
from keyscope.model.models import load_model
from tests import hf_tiny

DOCS = hf_tiny.TRAINING_TEXT * 3
JOB = CovarianceJob((0, 1), n_tokens=600, seq_len=32, batch_size=3, checkpoint_every=0)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return load_model(str(tiny_checkpoints["llama"]))


def _stop_after(k: int):
    seen = []

    def on_batch(index: int) -> None:
        seen.append(index)
        if len(seen) == k:
            raise Stop

    return on_batch


def test_parse_layers_and_job_checks():
    assert parse_layers("3-5") == [3, 4, 5] and parse_layers("7,2,2-3") == [2, 3, 7]
    for bad in ("", "a", "5-3", "1-x"):
        with pytest.raises(ValueError):
            parse_layers(bad)
    with pytest.raises(ValueError, match="repeat"):
        CovarianceJob((1, 1))
    with pytest.raises(ValueError, match="positive"):
        CovarianceJob((1,), n_tokens=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        CovarianceJob((1,), checkpoint_every=-1)


def test_one_pass_fills_the_same_cache_entries_as_load_or_compute(model, tmp_path, monkeypatch):
    result = compute_covariances(model, JOB, DOCS, root=tmp_path, progress=False)
    assert result.tokens == result.tokens_this_run == 600 and result.from_cache == []
    assert result.tokens_per_second is not None and result.tokens_per_second > 0
    for layer in (0, 1):  # computed alone, layer by layer, the estimate is bit-identical
        alone = KeyCovariance(layer, n_tokens=600, seq_len=32, batch_size=3, progress=False).fit(model, DOCS)
        torch.testing.assert_close(result.covariances[layer].C_, alone.C_, rtol=0, atol=0)

    def no_fit(*args, **kwargs):
        raise AssertionError("load_or_compute_covariance recomputed instead of using the job's cache entry")

    monkeypatch.setattr(KeyCovariance, "fit", no_fit)
    for layer in (0, 1):
        cached = load_or_compute_covariance(model, layer, DOCS, n_tokens=600, seq_len=32, batch_size=3,
                                            progress=False, root=tmp_path)
        torch.testing.assert_close(cached.C_, result.covariances[layer].C_, rtol=1e-15, atol=0)
    again = compute_covariances(model, JOB, DOCS, root=tmp_path, progress=False)
    assert again.from_cache == [0, 1] and again.tokens_this_run == 0 and again.tokens_per_second is None


def test_stopped_and_resumed_run_is_bit_exact(model, tmp_path):
    whole = compute_covariances(model, CovarianceJob((0, 1), 600, 32, 3, checkpoint_every=math.inf), DOCS,
                                root=tmp_path / "whole", progress=False)
    root = tmp_path / "stopped"
    specs = {layer: covariance_spec(model, JOB.config(layer), DOCS) for layer in JOB.layers}
    with pytest.raises(Stop):
        compute_covariances(model, JOB, DOCS, root=root, progress=False, on_batch=_stop_after(3))
    path = checkpoint_file(specs, JOB, SINGLE, root)
    assert path.exists()
    assert not cache.artefact_dir(KIND, specs[0], root).exists()  # nothing cached from a stopped run
    with pytest.raises(Stop):  # stopped again after resuming: checkpoints keep moving forward
        compute_covariances(model, JOB, DOCS, root=root, progress=False, resume=True, on_batch=_stop_after(2))
    resumed = compute_covariances(model, JOB, DOCS, root=root, progress=False, resume=True)
    assert resumed.resumed_tokens == 5 * 3 * 31 and resumed.tokens_this_run == 600 - 5 * 3 * 31
    assert not path.exists()  # removed once the cache is written
    for layer in (0, 1):
        diff = (resumed.covariances[layer].C_ - whole.covariances[layer].C_).abs().max()
        assert float(diff) == 0.0
        assert resumed.covariances[layer].n_tokens_ == 600


def test_a_run_that_can_never_finish_leaves_no_checkpoint(model, tmp_path):
    """Far too few tokens for C is an EmptyCorpus after the whole pass, and a resumed run would end in it again:
    the checkpoint written after every batch is removed with its folder (a run stopped any other way keeps its
    checkpoint: test_stopped_and_resumed_run_is_bit_exact)."""
    job = CovarianceJob((0,), n_tokens=100_000, seq_len=32, batch_size=3, checkpoint_every=0)
    path = checkpoint_file({0: covariance_spec(model, job.config(0), DOCS)}, job, SINGLE, tmp_path)
    written = []
    with pytest.raises(EmptyCorpus, match="yielded only"):
        compute_covariances(model, job, DOCS, root=tmp_path, progress=False,
                            on_batch=lambda index: written.append(path.exists()))
    assert len(written) > 1 and all(written)  # checkpointed along the way
    assert not path.exists() and not path.parent.exists()
    assert not cache.artefact_dir(KIND, covariance_spec(model, job.config(0), DOCS), tmp_path).exists()


def test_resume_without_or_with_a_damaged_checkpoint_starts_afresh(model, tmp_path):
    job = CovarianceJob((1,), 300, 32, 3, checkpoint_every=0)
    specs = {1: covariance_spec(model, job.config(1), DOCS)}
    with pytest.warns(UserWarning, match="no checkpoint of this job .*batch size 3, 1 process"):
        fresh, stats = fit_layers(model, job, DOCS, specs, resume=True, root=tmp_path, progress=False)
    assert stats["resumed_tokens"] == 0 and fresh[1].n_tokens_ == 300
    with pytest.raises(Stop):
        fit_layers(model, job, DOCS, specs, root=tmp_path, progress=False, on_batch=_stop_after(1))
    path = checkpoint_file(specs, job, SINGLE, tmp_path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.warns(UserWarning, match="starting afresh"):
        again, stats = fit_layers(model, job, DOCS, specs, resume=True, root=tmp_path, progress=False)
    assert stats["resumed_tokens"] == 0
    torch.testing.assert_close(again[1].C_, fresh[1].C_, rtol=0, atol=0)
