"""The key covariance ``C = E[k kᵀ]`` of one layer over a text corpus, and solves against it.

ROME (Meng et al. 2022, eq. 2) writes a fact ``(k*, v*)`` into ``W_out`` as the rank-one update
``ΔW = Λ (C⁻¹ k*)ᵀ`` where ``C = E[k kᵀ]`` is the **uncentred** second moment of the layer's keys over
generic text. The update moves another key ``k`` by ``ΔW k = Λ · kᵀC⁻¹k*``, so the edit's reach is measured
in the whitened inner product ``⟨a, b⟩_C = aᵀC⁻¹b`` (Yan et al., "Keys to Robust Edits", Sec. 3); see
:mod:`keyscope.analysis.similarity`.

Estimation (:class:`KeyCovariance`)
-----------------------------------
Keys of every counted corpus position are streamed batch by batch (:func:`keyscope.data.corpus.token_batches`
windows, forward pass stopped at the key by :func:`add_batch`, which serves several layers in one pass). **BOS and padding positions
are excluded** (the BOS position is the atypical attention-sink key and never a subject's last token);
every other position counts, including the EOS separators between packed documents. The exclusions are
recorded in the cache spec. Each batch adds ``keysᵀ keys`` computed as a float32 matmul on the keys'
device to a **float64** accumulator: each batch's products carry float32 rounding only (relative error of
order ``2⁻²⁴`` per product), while a float32 accumulator would drift as the token count grows; it is cheaper than a
float64 matmul (``docs/scaling.md``, "Numbers without an artefact"). Only the block upper triangle of ``keysᵀ keys`` is computed (about a third less work).
bf16/fp16 keys on CUDA use a tensor-core matmul with float32 accumulation and output, which is exact for
their products; keep TF32 off for float32 models (PyTorch's default).

Solves
------
``C⁻¹k`` is never formed from an explicit inverse: :meth:`KeyCovariance.solve` uses a Cholesky factor of
``C + λI`` with the ridge ``λ = ridge_scale · tr(C)/d`` (``ridge_scale = 1e-6`` by default: one millionth
of the mean eigenvalue, far below the key directions that matter, but enough to make a rank-deficient
estimate — fewer tokens than ``d_mlp`` — factorable). If the factorisation still fails, ``λ`` is raised
tenfold at a time (with a warning) up to ``1e-2 · tr(C)/d``; the ridge used is kept in ``ridge_``.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from keyscope._infra import cache
from keyscope._infra.distributed import ProcessRank, all_reduce_sum_
from keyscope._infra.errors import EmptyCorpus
from keyscope.data.corpus import Source, TokenBatch, corpus_id, default_corpus, prepends_bos, token_batches
from keyscope.model.capture import Site, run_to
from keyscope.model.models import check_layer, d_mlp, down_projection, key_hook, model_name, sdpa_attention

KIND = "key_covariance"
#: Bump when the estimator changes so old cache entries are not reused.
ESTIMATOR_VERSION = 1
MAX_RIDGE_SCALE = 1e-2
#: Block rows of the upper-triangular Gram update in :meth:`KeyCovariance.add`.
GRAM_BLOCKS = 4
#: A corpus that yields fewer than this share of the tokens asked for is refused (:class:`EmptyCorpus`), not
#: estimated from; between this share and all of them, ``C`` is estimated from what there is, with a warning.
MIN_TOKEN_SHARE = 0.1


@dataclass(frozen=True)
class CovarianceConfig:
    """How ``C`` is estimated: the layer, how many counted tokens, and how they are windowed."""

    layer: int
    n_tokens: int = 100_000
    seq_len: int = 256
    batch_size: int = 16
    prepend_bos: bool | None = None
    ridge_scale: float = 1e-6


class KeyCovariance:
    """Streaming estimate of ``C = E[k kᵀ]`` for the layer-``layer`` keys, scikit-learn style.

    Example::

        cov = KeyCovariance(layer=5, n_tokens=100_000).fit(model, "wikitext-103")
        cov.C_.shape, cov.n_tokens_        # (d_mlp, d_mlp), 100000
        cov.solve(k_star)                  # C⁻¹ k*, float64

    A :class:`keyscope.analysis.stats.RunningStat` (baukit's ``runningstats``): :meth:`add` (alias :meth:`partial_fit`)
    adds a block of keys to the raw float64 sum ``Σ k kᵀ`` and count, :meth:`merge` adds another estimate's
    sums (another shard of the corpus), :meth:`state_dict` / :meth:`load_state_dict` save and restore the
    raw sums and counts exactly (checkpoints, :mod:`keyscope.analysis.covariance_job`), and :meth:`all_reduce` sums them
    over ``torchrun`` ranks. Fitted attributes are derived
    from them only when read: ``C_`` (``(d_mlp, d_mlp)`` float64, ``Σ k kᵀ / n``), ``n_tokens_`` (keys
    averaged), ``ridge_`` (the ``λ`` of the last Cholesky factorisation); ``spec_`` (what was estimated, as
    stored in the cache) is set by :meth:`fit` and :meth:`load_state_dict`.
    """

    def __init__(
        self,
        layer: int,
        n_tokens: int = 100_000,
        seq_len: int = 256,
        batch_size: int = 16,
        prepend_bos: bool | None = None,
        ridge_scale: float = 1e-6,
        progress: bool = True,
    ):
        self.config = CovarianceConfig(layer, n_tokens, seq_len, batch_size, prepend_bos, ridge_scale)
        self.progress = progress
        self.spec_: dict = {}
        self._reset()

    def _reset(self) -> None:
        """Forget the running sums and everything derived from them."""
        self._sum: torch.Tensor | None = None  # (d_mlp, d_mlp) float64: block upper triangle of Σ k kᵀ
        self._count = 0  # keys added
        self._forget_derived()

    def _forget_derived(self) -> None:
        self._C: torch.Tensor | None = None  # (d_mlp, d_mlp) float64, cached C_
        self._cholesky: torch.Tensor | None = None
        self.ridge_: float | None = None

    # ------------------------------------------------------------------ running statistic
    def add(self, keys: torch.Tensor) -> KeyCovariance:
        """Add the rows of ``keys`` ``(n, d_mlp)`` to the running second moment ``Σ k kᵀ`` (float64).

        Only the block upper triangle is computed (:data:`GRAM_BLOCKS` block rows; ``C_`` mirrors it), which
        saves about a third of the matmul work. The sum lives on the keys' device.
        """
        keys = keys.reshape(-1, keys.shape[-1])  # (n, d_mlp)
        d = keys.shape[1]
        if self._sum is None:
            self._sum = torch.zeros((d, d), dtype=torch.float64, device=keys.device)  # (d_mlp, d_mlp)
        elif self._sum.shape[0] != d:
            raise ValueError(f"keys have {d} features but the running sum has {self._sum.shape[0]}")
        n_blocks = GRAM_BLOCKS if d >= 256 else 1
        step = -(-d // n_blocks)
        for lo in range(0, d, step):
            block = _gram(keys[:, lo : lo + step], keys[:, lo:])  # (step, d - lo), float32
            self._sum[lo : lo + step, lo:] += block.to(self._sum.device, torch.float64)
        self._count += int(keys.shape[0])
        self._forget_derived()
        return self

    def partial_fit(self, keys: torch.Tensor) -> KeyCovariance:
        """scikit-learn's name for :meth:`add`."""
        return self.add(keys)

    def merge(self, other: KeyCovariance) -> KeyCovariance:
        """Add ``other``'s raw sums and counts to this one's (the union of both key streams); returns self.

        Both must estimate the same layer's keys; ``other`` may be empty. The result equals, up to float64
        rounding of the sum's order, one estimate that saw both streams.
        """
        if other.config.layer != self.config.layer:
            raise ValueError(f"cannot merge layer {other.config.layer}'s covariance into layer {self.config.layer}'s")
        if other._sum is None:
            return self
        if self._sum is None:
            self._sum = other._sum.clone()
        elif self._sum.shape != other._sum.shape:
            raise ValueError(f"cannot merge sums of shapes {tuple(other._sum.shape)} and {tuple(self._sum.shape)}")
        else:
            self._sum += other._sum.to(self._sum.device)
        self._count += other._count
        self._forget_derived()
        return self

    def state_dict(self) -> dict:
        """The raw running state, as baukit's ``runningstats`` keeps it: ``sum`` (the float64 block upper
        triangle of ``Σ k kᵀ``, on the CPU; ``None`` before any key), ``n_tokens`` (int), ``config`` (the
        :class:`CovarianceConfig` as a dict) and ``spec`` (what was estimated). :meth:`load_state_dict` of a
        fresh instance restores it exactly."""
        return {
            "sum": None if self._sum is None else self._sum.detach().to("cpu", copy=True),
            "n_tokens": self._count,
            "config": asdict(self.config),
            "spec": dict(self.spec_),
        }

    def load_state_dict(self, state: dict, device=None) -> KeyCovariance:
        """Restore :meth:`state_dict` output (sums on ``device``, default the CPU); returns self."""
        self.config = CovarianceConfig(**state["config"])
        self._reset()
        total = state["sum"]
        self._sum = None if total is None else total.to(device=device, dtype=torch.float64, copy=True)
        self._count = int(state["n_tokens"])
        self.spec_ = dict(state.get("spec") or {})
        return self

    @property
    def n_tokens_(self) -> int:
        """Keys averaged in ``C_``."""
        return self._count

    def all_reduce(self, world: ProcessRank, d: int | None = None, device=None) -> KeyCovariance:
        """Sum the raw sums and counts over every rank of ``world`` (``torch.distributed``, float64 and int64);
        afterwards every rank holds the estimate of the union of their key streams. A rank that saw no keys
        contributes zeros ``(d, d)`` on ``device`` (``d``, the key width, is needed then). A no-op for a single
        process; returns self."""
        if not world.distributed:
            return self
        if self._sum is None:
            if d is None:
                raise ValueError("a rank that saw no keys needs the key width d to take part in the all-reduce")
            self._sum = torch.zeros((d, d), dtype=torch.float64, device=device)  # (d_mlp, d_mlp)
        count = torch.tensor([self._count], dtype=torch.int64, device=self._sum.device)
        all_reduce_sum_([self._sum, count], world)
        self._count = int(count.item())
        self._forget_derived()
        return self

    def fit_batches(self, model, batches: Iterable[TokenBatch]) -> KeyCovariance:
        """Accumulate the keys of the counted positions of ``batches`` (BOS and padding excluded)."""
        layer = check_layer(model, self.config.layer)
        bar = _progress(self.progress, self.config.n_tokens, f"C layer {layer}")
        try:
            for batch in batches:
                counted = add_batch(model, {layer: self}, batch)
                if bar is not None:
                    bar.update(counted)
        finally:
            if bar is not None:
                bar.close()
        return self

    def fit(self, model, corpus: Source | None = None) -> KeyCovariance:
        """Estimate ``C`` from ``config.n_tokens`` counted tokens of ``corpus`` (default: :func:`default_corpus`).

        A corpus that runs out warns; one that yields fewer than :data:`MIN_TOKEN_SHARE` of the tokens asked for
        (or that :func:`keyscope.data.corpus.token_batches` refuses: empty, binary, mostly unknown tokens) raises
        :class:`~keyscope._infra.errors.EmptyCorpus`, so :func:`load_or_compute_covariance` never caches it."""
        corpus = default_corpus(model) if corpus is None else corpus
        cfg = self.config
        self._reset()
        one_shot = not isinstance(corpus, (str, Path, list, tuple))
        self.spec_ = {"corpus": "one-shot iterator"} if one_shot else covariance_spec(model, cfg, corpus)
        batches = token_batches(model.tokenizer, corpus, cfg.n_tokens, cfg.seq_len, cfg.batch_size, cfg.prepend_bos)
        self.fit_batches(model, batches)
        if self.n_tokens_ < MIN_TOKEN_SHARE * cfg.n_tokens:
            raise EmptyCorpus(f"the corpus yielded only {self.n_tokens_:,} of the {cfg.n_tokens:,} tokens asked for C; "
                              f"give a larger corpus or ask for fewer tokens")
        if self.n_tokens_ < cfg.n_tokens:
            warnings.warn(
                f"the corpus ran out after {self.n_tokens_:,} of the {cfg.n_tokens:,} tokens asked for; "
                f"C is estimated from {self.n_tokens_:,}",
                stacklevel=2,
            )
        return self

    @property
    def C_(self) -> torch.Tensor:
        """``E[k kᵀ]``: ``(d_mlp, d_mlp)`` float64, symmetric (finalised from the raw sums on first read)."""
        if self._sum is None or self._count == 0:
            raise RuntimeError("KeyCovariance is not fitted yet: call fit() or add() first")
        if self._C is None:
            C = torch.triu(self._sum)  # (d, d): the accumulated block upper triangle
            C += torch.triu(C, 1).T
            self._C = C.div_(self._count)
        return self._C

    # ------------------------------------------------------------------ solves
    def cholesky(self) -> torch.Tensor:
        """Lower Cholesky factor ``L`` of ``C + λI`` (cached), ``λ`` as in the module docstring."""
        if self._cholesky is not None:
            return self._cholesky
        C = self.C_  # (d, d)
        d = C.shape[0]
        mean_eig = float(torch.trace(C)) / d
        scale = self.config.ridge_scale
        while True:
            ridge = scale * mean_eig if mean_eig > 0 else scale
            regularised = C.clone()  # (d, d)
            regularised.diagonal().add_(ridge)
            L, info = torch.linalg.cholesky_ex(regularised)  # (d, d) lower
            del regularised
            if int(info) == 0:
                break
            if scale >= MAX_RIDGE_SCALE:
                raise RuntimeError(f"C + λI is not positive definite even with λ = {scale:g}·tr(C)/d")
            scale *= 10
            warnings.warn(f"C is not numerically positive definite; raising the ridge to {scale:g}·tr(C)/d", stacklevel=2)
        self._cholesky, self.ridge_ = L, ridge
        return L

    def solve(self, key: torch.Tensor) -> torch.Tensor:
        """``(C + λI)⁻¹ k`` for a key ``(d_mlp,)`` or for each row of ``(n, d_mlp)``; float64 on ``C``'s device."""
        L = self.cholesky()  # (d, d)
        rhs = key.to(L.device, torch.float64)
        if rhs.dim() == 1:
            return torch.cholesky_solve(rhs[:, None], L)[:, 0]  # (d,)
        return torch.cholesky_solve(rhs.T, L).T  # (n, d)

    # ------------------------------------------------------------------ (de)serialisation
    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"C": self.C_.cpu(), "n_tokens": torch.tensor(self.n_tokens_, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: CovarianceConfig, spec: dict | None = None,
                     device=None) -> KeyCovariance:
        """Rebuild a fitted estimate from :meth:`to_tensors` output."""
        cov = cls(**asdict(config), progress=False)
        n = int(tensors["n_tokens"])
        cov._sum = tensors["C"].to(device=device, dtype=torch.float64) * n
        cov._count = n
        cov.spec_ = dict(spec or {})
        return cov


def add_batch(model, covariances: Mapping[int, KeyCovariance], batch: TokenBatch) -> int:
    """One stopped forward pass over ``batch`` adding the counted keys of every layer in ``covariances``.

    Each layer's :func:`~keyscope.model.models.key_hook` is a capture site whose ``keep`` adds that layer's keys at the
    counted positions (``batch.key_mask``: BOS and padding excluded) to its :class:`KeyCovariance` as soon as they
    exist, so no layer's keys are held after its own Gram product; the forward pass is stopped after the highest
    layer's key (:func:`keyscope.model.capture.run_to`). No attention pattern is read, so attention runs through the
    fused SDPA kernel (:func:`keyscope.model.models.sdpa_attention`; the keys agree with eager attention to float
    rounding). Returns the number of counted positions.
    """
    layers = sorted(covariances)
    for layer in layers:
        check_layer(model, layer)
    device = model.cfg.device
    key_mask = batch.key_mask.to(device)  # (batch, pos)

    def add(activation: torch.Tensor, layer: int) -> None:
        covariances[layer].add(activation[key_mask])  # (n_counted, d_mlp)

    sites = [Site(key_hook(layer), functools.partial(add, layer=layer)) for layer in layers]
    with torch.no_grad(), sdpa_attention(model):
        run_to(model, batch.input_ids.to(device), sites, batch.attention_mask.to(device))
    return int(batch.key_mask.sum())


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ b`` in float32: ``(n, p)``, ``(n, q)`` → ``(p, q)``.

    Half-precision keys on CUDA use a tensor-core matmul with float32 accumulation and output (products of
    bf16/fp16 numbers are exact in float32); everything else is a float32 matmul.
    """
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a.T, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float().T @ b.float()


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False)


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def upstream_fingerprint(model, layer: int) -> str:
    """A hash of every weight the layer-``layer`` keys depend on.

    Covers the parameters outside the block stack (embeddings, final norm, unembedding) and those of blocks
    ``0..layer`` except layer ``layer``'s down-projection, whose edits do not change its own keys. So a
    retrained model (factworld) or one edited in an earlier layer gets a fresh covariance, while an edit at
    ``layer`` itself reuses the cached one — as ROME does, estimating ``C`` before any edit.
    """
    skip = {id(p) for p in down_projection(model, layer).parameters()}

    def counted(name: str, param) -> bool:
        match = _LAYER_INDEX.search(name)
        return id(param) not in skip and not (match and int(match.group(1)) > layer)

    return _fingerprint(model, counted)


def weights_fingerprint(model) -> str:
    """A hash of every weight of ``model`` (:func:`upstream_fingerprint`'s digest over all parameters): what a
    result of the whole model's outputs depends on (the per-fact checkpoints of :func:`keyscope.evaluation.evaluate.run_facts`)."""
    return _fingerprint(model, lambda name, param: True)


def _fingerprint(model, counted) -> str:
    """The first 16 hex digits of a SHA-256 over the name, shape, sum and sum of squares (float64) of each
    parameter ``counted(name, param)`` keeps."""
    import hashlib

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.original_model.named_parameters():
            if not counted(name, param):
                continue
            p = param.detach().to(torch.float64)
            digest.update(f"{name}:{tuple(param.shape)}:{float(p.sum())!r}:{float((p * p).sum())!r};".encode())
    return digest.hexdigest()[:16]


def covariance_spec(model, config: CovarianceConfig, corpus: Source) -> dict:
    """The cache key of a covariance: model, weights, layer, corpus, token count, windowing and exclusions."""
    dtype = next(model.original_model.parameters()).dtype
    return {
        "estimator": ESTIMATOR_VERSION,
        "model": model_name(model),
        "weights": upstream_fingerprint(model, config.layer),
        "dtype": str(dtype),
        "layer": config.layer,
        "d_mlp": d_mlp(model),
        "corpus": corpus_id(corpus),
        "n_tokens": config.n_tokens,
        "seq_len": config.seq_len,
        "bos": prepends_bos(model.tokenizer, config.prepend_bos),
        "excluded": ["bos", "padding"],
        "moment": "uncentred E[k k^T], float32 batch matmul into float64 sum",
    }


def load_or_compute_covariance(
    model,
    layer: int,
    corpus: Source | None = None,
    n_tokens: int = 100_000,
    recompute: bool = False,
    seq_len: int = 256,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    ridge_scale: float = 1e-6,
    progress: bool = True,
    root=None,
) -> KeyCovariance:
    """The layer-``layer`` :class:`KeyCovariance` of ``model`` over ``corpus``, from the cache when possible.

    Cached through :func:`keyscope._infra.cache.cached` under the :func:`covariance_spec` (model name and upstream
    weights fingerprint, layer, corpus id, token count, window length, BOS convention, exclusions).
    ``recompute=True`` ignores and overwrites the cache. ``C_`` is returned on the model's device. ``model``: a
    bridge or a Hugging Face model (:func:`keyscope.model.models.as_bridge`: the same cache entry either way).
    """
    from keyscope.model.models import as_bridge

    model = as_bridge(model)
    check_layer(model, layer)
    corpus = default_corpus(model) if corpus is None else corpus
    config = CovarianceConfig(layer, n_tokens, seq_len, batch_size, prepend_bos, ridge_scale)
    spec = covariance_spec(model, config, corpus)

    def compute() -> dict[str, torch.Tensor]:
        cov = KeyCovariance(**asdict(config), progress=progress).fit(model, corpus)
        return cov.to_tensors()

    tensors = cache.cached(KIND, spec, compute, recompute=recompute, root=root)
    return KeyCovariance.from_tensors(tensors, config, spec, device=model.cfg.device)
