"""``C`` for several layers in one resumable, shardable pass over a corpus (``keyscope covariance``).

:func:`compute_covariances` estimates the key covariance ``C = E[k kᵀ]`` of every requested layer exactly as
:func:`keyscope.analysis.covariance.load_or_compute_covariance` does (same :func:`~keyscope.analysis.covariance.covariance_spec`,
same cache entries, so every later command finds them), but

* **in one pass**: each batch of corpus windows (:func:`keyscope.data.corpus.token_batches`) runs one forward pass
  with a key hook on every requested layer, stopped after the highest one
  (:func:`keyscope.analysis.covariance.add_batch`);
* **resumably**: every ``checkpoint_every`` seconds (after a whole batch) the raw float64 sums and counts of
  every layer and the index of the next batch are written atomically to one safetensors file
  (:func:`keyscope._infra.atomic.atomic_write`) in ``<cache>/key_covariance_checkpoint/<hash>/``. ``resume=True``
  restores them and skips the batches already added. Batch boundaries are those of the corpus stream, not of
  the run, and the float64 sums are saved exactly, so a stopped and resumed run adds the same float32 Gram
  blocks in the same order as an uninterrupted one: the same ``C`` bit for bit (on a deterministic device).
  The checkpoint interval only decides how much work a stop loses, never the result;
* **across processes** (:mod:`keyscope._infra.distributed`, launched by ``torchrun``): rank ``r`` of ``K`` takes
  batches ``r, r+K, …`` of the stream, the raw sums and counts are all-reduced, and rank 0 alone writes the
  cache. Each rank checkpoints its own share (the world size is part of the checkpoint's name).

The checkpoint is deleted once the cache entries are written, and when the run ends in
:class:`~keyscope._infra.errors.EmptyCorpus` (far fewer tokens than asked for, a binary corpus, one of unknown tokens):
that depends only on the corpus, whose identity is part of the checkpoint's spec, so a resumed run would end in
the same error and the checkpoint could never be used. A run stopped any other way keeps it for ``resume=True``:
Ctrl-C, a crash, a full disk, out of memory, another rank's failure, or a corpus not reachable right now
(WikiText-103 offline) — the same job can still finish.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from keyscope._infra import cache
from keyscope._infra.atomic import atomic_write
from keyscope._infra.distributed import SINGLE, ProcessRank, all_reduce_sum_, barrier, broadcast_object, shard
from keyscope._infra.errors import CorruptCache, EmptyCorpus
from keyscope.analysis.covariance import (
    KIND,
    MIN_TOKEN_SHARE,
    CovarianceConfig,
    KeyCovariance,
    add_batch,
    covariance_spec,
)
from keyscope.data.corpus import Source, token_batches
from keyscope.model.models import check_layer, d_mlp

CHECKPOINT_KIND = "key_covariance_checkpoint"
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class CovarianceJob:
    """What one pass estimates: ``layers``, and the windowing shared by all of them (as in
    :class:`~keyscope.analysis.covariance.CovarianceConfig`). ``checkpoint_every`` is in seconds (0: after every
    batch; ``math.inf``: never)."""

    layers: tuple[int, ...]
    n_tokens: int = 100_000
    seq_len: int = 256
    batch_size: int = 16
    prepend_bos: bool | None = None
    ridge_scale: float = 1e-6
    checkpoint_every: float = 300.0

    def __post_init__(self):
        if not self.layers:
            raise ValueError("give at least one layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers repeat: {list(self.layers)}")
        for name in ("n_tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not self.checkpoint_every >= 0:
            raise ValueError(f"checkpoint_every must be ≥ 0 seconds, not {self.checkpoint_every}")

    def config(self, layer: int) -> CovarianceConfig:
        return CovarianceConfig(layer, self.n_tokens, self.seq_len, self.batch_size, self.prepend_bos,
                                self.ridge_scale)


@dataclass
class JobResult:
    """The covariances of a :func:`compute_covariances` run and what it cost."""

    covariances: dict[int, KeyCovariance]
    cache_dirs: dict[int, Path]
    from_cache: list[int]  # layers found in the cache, not computed
    tokens: int  # counted tokens in each computed C (all ranks)
    tokens_this_run: int  # tokens added by this run (not restored from a checkpoint), all ranks
    resumed_tokens: int  # tokens restored from checkpoints, all ranks
    seconds: float
    checkpoints_written: int = 0
    world_size: int = 1

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens_this_run / self.seconds if self.tokens_this_run and self.seconds > 0 else None


def checkpoint_file(specs: dict[int, dict], job: CovarianceJob, world: ProcessRank, root=None) -> Path:
    """Where rank ``world.rank`` of a ``world.size``-process run of ``job`` keeps its checkpoint."""
    return cache.artefact_dir(CHECKPOINT_KIND, _checkpoint_spec(specs, job, world), root) / (
        f"rank{world.rank}of{world.size}.safetensors")


def _checkpoint_spec(specs: dict[int, dict], job: CovarianceJob, world: ProcessRank) -> dict:
    return {"format": CHECKPOINT_FORMAT, "layers": [specs[layer] for layer in sorted(specs)],
            "batch_size": job.batch_size, "world_size": world.size}


def save_checkpoint(path: Path, spec: dict, covariances: dict[int, KeyCovariance], next_batch: int) -> None:
    """Write the raw sums and counts of ``covariances`` and the next batch index to ``path`` atomically."""
    from safetensors.torch import save_file

    tensors = {"next_batch": torch.tensor(next_batch, dtype=torch.int64)}
    for layer, cov in covariances.items():
        state = cov.state_dict()
        if state["sum"] is not None:
            tensors[f"sum.{layer}"] = state["sum"].contiguous()
        tensors[f"n_tokens.{layer}"] = torch.tensor(state["n_tokens"], dtype=torch.int64)
    metadata = {"spec": cache.canonical_json(spec)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: Path, spec: dict, covariances: dict[int, KeyCovariance], device=None) -> int:
    """Restore ``covariances`` from the checkpoint at ``path``; return the index of the next batch.

    Raises :class:`FileNotFoundError` when there is none and :class:`CorruptCache` when it cannot be read or
    was written for another spec.
    """
    from safetensors import safe_open

    if not path.exists():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get("spec")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # a damaged file is never used silently
        raise CorruptCache(f"covariance checkpoint {path} cannot be read: {exc}") from exc
    if stored != cache.canonical_json(spec):
        raise CorruptCache(f"covariance checkpoint {path} was written for a different job")
    for layer, cov in covariances.items():
        total = tensors.get(f"sum.{layer}")
        cov.load_state_dict({"sum": total, "n_tokens": int(tensors[f"n_tokens.{layer}"]),
                             "config": asdict(cov.config), "spec": cov.spec_}, device=device)
    return int(tensors["next_batch"])


def fit_layers(
    model,
    job: CovarianceJob,
    corpus: Source,
    specs: dict[int, dict],
    *,
    world: ProcessRank = SINGLE,
    resume: bool = False,
    root=None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[int, KeyCovariance], dict]:
    """This rank's share of one pass over ``corpus`` for the layers of ``specs``, all-reduced over ``world``.

    Returns ``(covariances, stats)``; ``stats`` holds ``tokens_this_run``, ``resumed_tokens`` (both summed
    over ranks), ``seconds`` and ``checkpoints_written``. ``on_batch(index)`` is called after each of this
    rank's batches is added (and checkpointed, when due).
    """
    layers = sorted(specs)

    def empty() -> dict[int, KeyCovariance]:
        covariances = {layer: KeyCovariance(**asdict(job.config(layer)), progress=False) for layer in layers}
        for layer in layers:
            covariances[layer].spec_ = specs[layer]
        return covariances

    covariances = empty()
    spec = _checkpoint_spec(specs, job, world)
    path = checkpoint_file(specs, job, world, root)
    device = model.cfg.device
    start = 0
    if resume:
        try:
            start = load_checkpoint(path, spec, covariances, device=device)
        except FileNotFoundError:  # a changed spec, batch size or number of processes is another job
            warnings.warn(f"no checkpoint of this job (layers {', '.join(map(str, layers))}, batch size "
                          f"{job.batch_size}, {world.size} process{'es' if world.size > 1 else ''}) to resume; "
                          "starting afresh (a stopped run continues only with the same settings and --batch-size)",
                          stacklevel=2)
        except CorruptCache as exc:
            warnings.warn(f"{exc}; starting afresh", stacklevel=2)
            covariances = empty()
    restored = covariances[layers[0]].n_tokens_
    bar = None
    if progress and world.is_main:
        from tqdm.auto import tqdm

        share = -(-job.n_tokens // world.size)
        bar = tqdm(total=share, initial=restored, desc=f"C layer{'s' if len(layers) > 1 else ''} "
                   f"{','.join(map(str, layers))}" + (f" (rank 0 of {world.size})" if world.distributed else ""),
                   unit="tok", unit_scale=True, leave=False)
    batches = token_batches(model.tokenizer, corpus, job.n_tokens, job.seq_len, job.batch_size, job.prepend_bos)
    written = 0
    began = last_checkpoint = time.monotonic()
    try:
        for index, batch in shard(batches, world, start=start):
            counted = add_batch(model, covariances, batch)
            if bar is not None:
                bar.update(counted)
            if math.isfinite(job.checkpoint_every) and time.monotonic() - last_checkpoint >= job.checkpoint_every:
                save_checkpoint(path, spec, covariances, index + 1)
                written += 1
                last_checkpoint = time.monotonic()
            if on_batch is not None:
                on_batch(index)
    finally:
        if bar is not None:
            bar.close()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.monotonic() - began
    fresh = covariances[layers[0]].n_tokens_ - restored
    counts = torch.tensor([fresh, restored], dtype=torch.int64)
    if world.distributed:
        counts = counts.to(device)
        all_reduce_sum_([counts], world)
        for cov in covariances.values():
            cov.all_reduce(world, d_mlp(model), device=device)
    stats = {"tokens_this_run": int(counts[0]), "resumed_tokens": int(counts[1]), "seconds": seconds,
             "checkpoints_written": written, "checkpoint": path}
    return covariances, stats


def _remove_checkpoint(path: Path) -> None:
    """Delete this rank's checkpoint ``path``, and the job's folder once no rank's checkpoint is left in it."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def parse_layers(text: str) -> list[int]:
    """``"3-8"``, ``"2,5,9"`` or a mix (``"0-2,7"``) as a sorted list of distinct layers."""
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"cannot read layers {text!r}; write e.g. 3-8 or 2,5,9") from None
        if last < first:
            raise ValueError(f"layer range {part!r} runs backwards")
        layers.update(range(first, last + 1))
    if not layers:
        raise ValueError(f"no layers in {text!r}")
    return sorted(layers)


def compute_covariances(
    model,
    job: CovarianceJob,
    corpus: Source,
    *,
    world: ProcessRank = SINGLE,
    recompute: bool = False,
    resume: bool = False,
    root=None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> JobResult:
    """The covariances of ``job.layers`` over ``corpus``: cached ones loaded, the others estimated in one
    pass (:func:`fit_layers`) and cached by rank 0 under the same spec :func:`load_or_compute_covariance`
    uses. Covariances are on the model's device; ranks other than 0 return only the layers they computed
    (rank 0 alone reads and writes the cache)."""
    for layer in job.layers:
        check_layer(model, layer)
    specs = {layer: covariance_spec(model, job.config(layer), corpus) for layer in job.layers}
    cached: dict[int, dict[str, torch.Tensor]] = {}
    if world.is_main and not recompute:
        for layer in job.layers:
            try:
                cached[layer] = cache.load(KIND, specs[layer], root)
            except FileNotFoundError:
                pass
            except CorruptCache as exc:
                warnings.warn(f"{exc}; recomputing it", stacklevel=2)
    todo = broadcast_object(sorted(set(job.layers) - set(cached)), world)
    device = model.cfg.device
    covariances = {layer: KeyCovariance.from_tensors(tensors, job.config(layer), specs[layer], device=device)
                   for layer, tensors in cached.items()}
    stats = {"tokens_this_run": 0, "resumed_tokens": 0, "seconds": 0.0, "checkpoints_written": 0, "checkpoint": None}
    if todo:
        checkpoint = checkpoint_file({layer: specs[layer] for layer in todo}, job, world, root)
        try:
            fitted, stats = fit_layers(model, job, corpus, {layer: specs[layer] for layer in todo}, world=world,
                                       resume=resume, root=root, progress=progress, on_batch=on_batch)
            n = fitted[todo[0]].n_tokens_
            if n < MIN_TOKEN_SHARE * job.n_tokens:  # every rank sees the all-reduced count: all raise, none caches
                raise EmptyCorpus(f"the corpus yielded only {n:,} of the {job.n_tokens:,} tokens asked for C; "
                                  f"give a larger corpus or ask for fewer tokens")
        except EmptyCorpus:  # this job can never finish: its checkpoint would only linger (module docstring)
            _remove_checkpoint(checkpoint)
            raise
        if n < job.n_tokens and world.is_main:
            warnings.warn(f"the corpus ran out after {n:,} of the {job.n_tokens:,} tokens asked for; "
                          f"C is estimated from {n:,}", stacklevel=2)
        if world.is_main:
            for layer in todo:
                try:
                    cache.save(KIND, specs[layer], fitted[layer].to_tensors(), root)
                except OSError as exc:
                    warnings.warn(f"could not write the {KIND} cache under {cache.cache_root(root)} ({exc}); "
                                  f"result not cached", stacklevel=2)
        barrier(world)
        _remove_checkpoint(checkpoint)
        covariances.update(fitted)
    return JobResult(
        covariances={layer: covariances[layer] for layer in job.layers if layer in covariances},
        cache_dirs={layer: cache.artefact_dir(KIND, specs[layer], root) for layer in job.layers},
        from_cache=sorted(set(job.layers) - set(todo)),
        tokens=max(cov.n_tokens_ for cov in covariances.values()) if covariances else 0,
        tokens_this_run=stats["tokens_this_run"],
        resumed_tokens=stats["resumed_tokens"],
        seconds=stats["seconds"],
        checkpoints_written=stats["checkpoints_written"],
        world_size=world.size,
    )


def summary(result: JobResult, model_label: str, corpus_label: str) -> dict:
    """The JSON report of a run: tokens, seconds and tokens per second overall and per layer."""
    return {
        "model": model_label,
        "corpus": corpus_label,
        "layers": [
            {"layer": layer, "n_tokens": cov.n_tokens_, "from_cache": layer in result.from_cache,
             "cache": str(result.cache_dirs[layer]), "d_mlp": int(cov.C_.shape[0]),
             "trace_over_d": float(torch.trace(cov.C_)) / int(cov.C_.shape[0])}
            for layer, cov in result.covariances.items()
        ],
        "tokens": result.tokens,
        "tokens_this_run": result.tokens_this_run,
        "resumed_tokens": result.resumed_tokens,
        "seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second,
        "checkpoints_written": result.checkpoints_written,
        "world_size": result.world_size,
    }


def shared_covariance(
    model,
    layer: int,
    corpus: Source,
    *,
    world: ProcessRank = SINGLE,
    n_tokens: int = 100_000,
    prepend_bos: bool | None = None,
    recompute: bool = False,
    progress: bool = True,
    root=None,
) -> KeyCovariance:
    """The layer-``layer`` key covariance on every rank of ``world``, identical on all of them.

    A single process gets :func:`keyscope.analysis.covariance.load_or_compute_covariance` unchanged. Several processes
    run :func:`compute_covariances` (the cache entry when rank 0 finds it, else one pass sharded over the ranks
    and cached by rank 0; the same spec, so the entry serves both), and every rank then rebuilds ``C`` from rank
    0's :meth:`~keyscope.analysis.covariance.KeyCovariance.to_tensors` — as a single process rebuilds it from the cache
    — so every rank edits and scores with the same ``C``, bit for bit.
    """
    from keyscope.analysis.covariance import load_or_compute_covariance

    if not world.distributed:
        return load_or_compute_covariance(model, layer, corpus, n_tokens=n_tokens, recompute=recompute,
                                          prepend_bos=prepend_bos, progress=progress, root=root)
    job = CovarianceJob((layer,), n_tokens=n_tokens, prepend_bos=prepend_bos, checkpoint_every=math.inf)
    result = compute_covariances(model, job, corpus, world=world, recompute=recompute, root=root, progress=progress)
    tensors = broadcast_object(result.covariances[layer].to_tensors() if world.is_main else None, world)
    spec = covariance_spec(model, job.config(layer), corpus)
    return KeyCovariance.from_tensors(tensors, job.config(layer), spec, device=model.cfg.device)
