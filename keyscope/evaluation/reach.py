"""An edit's reach, shown before it is applied and then checked against what the edit really does.

**Prediction.** Any locate-and-edit method tells how much of its edit a key ``k`` of an edited layer
receives: the edit strength ``s(k)`` (:meth:`keyscope.editing.base.ModelEdit.strength`), for ROME
``s(k) = kᵀC⁻¹k* / k*ᵀC⁻¹k*`` (Yan et al., "Keys to Robust Edits", Lemma 4.1 / 4.7), under ROME+REP the
strength ``α(k̂)`` of the adapted key — so REP's gate and adaptor decide the reach (Lemma 4.6) — and for a
batch editor one strength per edited layer. :func:`analyse` streams a corpus through the model, stopped
after the last edited layer, scores every position by ``s`` (the largest over the edited layers,
:func:`edit_score`, through :func:`keyscope.analysis.scan.scan_scores`; the subject's own occurrences and everything
related to it masked by the **strict** filter of :func:`keyscope.analysis.scan.filter_variants`, so what is left is
unrelated text) and keeps the ``top_k`` positions with their decoded prefixes. Beside them it scores the
subject's own perturbed forms (rephrased, shuffled, in a long context: the probes of ``keyscope edit``) —
what the edit will *miss* — and gives a **verdict**: the number of unrelated positions whose ``s`` exceeds
the median strength of the subject's rephrased forms (of all its perturbed forms when it has none), i.e.
unrelated text that receives more of the edit than a typical rephrasing of the subject does.

**Check.** :func:`check` measures the real change: each of the ``top_k`` positions and as many **random**
positions (drawn uniformly without replacement, with ``seed``, among the scanned positions that the strict
filter keeps and that are not among the top ones) are re-run in the very window the scan scored them in,
once unedited and once with the edit applied reversibly (:meth:`~keyscope.editing.base.ModelEdit.applied`); at
each position the next-token distributions ``p`` (unedited) and ``q`` (edited) give

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)          (float64, from the log-softmax of the logits)

and whether the top-1 token flips. A position **actually changed** when its KL exceeds ``τ_KL``, the
``changed_quantile`` (0.95) quantile of the random positions' KL (numpy's linear interpolation), **or** its
top-1 token flips: the random positions are the edit's own background, so "changed" means changed more than
19 in 20 typical positions of the same text (or visibly, by the top-1). ``precision_at_k`` is the fraction of
the ``top_k`` predicted positions that actually changed (for comparison, ``random_changed_fraction`` is the
fraction of random positions that did, about ``1 − changed_quantile`` plus their flips), and ``spearman`` the
rank correlation of ``s`` with the KL over the top and random positions together. The check recomputes ``s``
at each position from the keys of the re-run (per edited layer), so the reported strengths are those of the
measured forward pass.

This module is evaluation (layer 5): it uses editing through :class:`~keyscope.editing.base.ModelEdit` only and
knows no method by name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from keyscope._infra.errors import KeyscopeError
from keyscope.analysis import scan
from keyscope.analysis.similarity import probe_keys
from keyscope.data.corpus import Source, prepends_bos, token_batches
from keyscope.data.datasets import Fact
from keyscope.data.perturbations import ORIGINAL, REPHRASE
from keyscope.data.prompts import length_batches, pad_batch
from keyscope.model.capture import Site, capture
from keyscope.model.models import key_hook

__all__ = ["ReachConfig", "Reached", "Form", "Check", "Reach", "edit_score", "form_strengths", "analyse", "check",
           "kl_divergence", "spearman", "subject_variants"]


@dataclass(frozen=True)
class ReachConfig:
    """What is scanned and checked. ``n_tokens``/``seq_len``/``batch_size``: the corpus windows (as
    :class:`keyscope.analysis.scan.ScanConfig`); ``top_k``: positions listed and checked; ``window``: positions masked
    after each subject occurrence; ``prefix_tokens``: tokens of context shown per position; ``seed``: the
    random positions; ``changed_quantile``: the random positions' KL quantile above which a position counts as
    changed; ``check_batch_size``: windows per forward pass of the check; ``tau``: the gate threshold of a
    gated edit (default: its own)."""

    n_tokens: int = 100_000
    top_k: int = 20
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 16
    window: int = 10
    prefix_tokens: int = 20
    changed_quantile: float = 0.95
    check_batch_size: int = 8
    tau: float | None = None
    prepend_bos: bool | None = None

    def __post_init__(self) -> None:
        self.scan_config(0)  # validates the scan's fields
        if self.check_batch_size < 1:
            raise ValueError(f"ReachConfig.check_batch_size must be positive, not {self.check_batch_size}")
        if not 0.0 < self.changed_quantile < 1.0:
            raise ValueError(f"ReachConfig.changed_quantile must lie in (0, 1), not {self.changed_quantile}")

    def scan_config(self, layer: int) -> scan.ScanConfig:
        return scan.ScanConfig(layer=layer, n_tokens=self.n_tokens, seq_len=self.seq_len, batch_size=self.batch_size,
                               top_k=self.top_k, window=self.window, prefix_tokens=self.prefix_tokens,
                               prepend_bos=self.prepend_bos)


@dataclass(frozen=True)
class Reached:
    """One corpus position: its index in the counted token stream, the decoded prefix ending at it, the edit
    strength ``s`` (largest over the edited layers) and per layer; after :func:`check`, the KL of the
    next-token distribution (unedited ‖ edited), whether the top-1 flips, and the top-1 tokens."""

    position: int
    prefix: str
    strength: float
    strengths: dict[int, float] = field(default_factory=dict)
    kl: float | None = None
    flipped: bool | None = None
    top1_before: str | None = None
    top1_after: str | None = None
    changed: bool | None = None

    def as_json(self) -> dict:
        out = {"position": self.position, "prefix": self.prefix, "strength": self.strength,
               "strengths": {str(layer): s for layer, s in self.strengths.items()}}
        if self.kl is not None:
            out.update(kl=self.kl, flipped=self.flipped, changed=self.changed, top1_before=self.top1_before,
                       top1_after=self.top1_after)
        return out


@dataclass(frozen=True)
class Form:
    """One of the subject's own perturbed forms (a probe) and the edit strength of its key."""

    kind: str
    source: str
    prompt: str
    subject: str
    strength: float
    strengths: dict[int, float] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"kind": self.kind, "source": self.source, "prompt": self.prompt, "subject": self.subject,
                "strength": self.strength, "strengths": {str(layer): s for layer, s in self.strengths.items()}}


@dataclass(frozen=True)
class Check:
    """The measured change at the top and the random positions (module docstring)."""

    top: tuple[Reached, ...]
    random: tuple[Reached, ...]
    kl_threshold: float
    precision_at_k: float
    spearman: float | None
    top_kl_median: float
    random_kl_median: float
    top_flip_rate: float
    random_flip_rate: float
    random_changed_fraction: float
    changed_quantile: float
    seconds: float = 0.0

    def as_json(self) -> dict:
        return {"precision_at_k": self.precision_at_k, "spearman": self.spearman, "top_kl_median": self.top_kl_median,
                "random_kl_median": self.random_kl_median, "kl_threshold": self.kl_threshold,
                "changed": f"KL > the {self.changed_quantile:g} quantile of the random positions' KL, or a top-1 flip",
                "top_flip_rate": self.top_flip_rate, "random_flip_rate": self.random_flip_rate,
                "random_changed_fraction": self.random_changed_fraction, "n_top": len(self.top),
                "n_random": len(self.random), "random": [r.as_json() for r in self.random],
                "seconds": self.seconds}


@dataclass
class Reach:
    """The prediction (``top``, ``missed``, the verdict) and, once checked, the ``check``."""

    layers: tuple[int, ...]
    top: tuple[Reached, ...]
    missed: tuple[Form, ...]
    original: Form | None
    reference: float | None  # median strength of the rephrased (else all perturbed) forms
    reference_kind: str
    n_above_reference: int | None
    n_tokens: int
    n_excluded: int
    check: Check | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """One line: how many unrelated positions receive more of the edit than the median rephrasing."""
        if self.reference is None:
            return (f"the subject has no perturbed forms to compare with; the strongest unrelated position gets "
                    f"s = {self.top[0].strength:.3f}" if self.top else "no unrelated position was scanned")
        n_unrelated = self.n_tokens - self.n_excluded
        share = self.n_above_reference / n_unrelated if n_unrelated else 0.0
        return (f"{self.n_above_reference:,} of {n_unrelated:,} unrelated positions ({100 * share:.2g}%) receive more "
                f"of the edit than the median {self.reference_kind} (s = {self.reference:.3f})")

    def as_json(self) -> dict:
        top = self.check.top if self.check is not None else self.top  # checked: with strengths per layer, KL
        return {"layers": list(self.layers), "n_tokens": self.n_tokens, "n_excluded": self.n_excluded,
                "top": [r.as_json() for r in top], "missed": [f.as_json() for f in self.missed],
                "original": self.original.as_json() if self.original else None,
                "verdict": {"text": self.verdict, "n_above_reference": self.n_above_reference,
                            "reference_strength": self.reference, "reference": f"median {self.reference_kind}",
                            "n_unrelated": self.n_tokens - self.n_excluded},
                "check": None if self.check is None else self.check.as_json(),
                "seconds": dict(self.seconds)}


# ---------------------------------------------------------------------------------------------- strengths


def edit_score(edit, request: int = 0, tau: float | None = None):
    """The scan score of ``edit``: keys ``{layer: (P, d_mlp)}`` of every edited layer → ``(P, 1)``, the
    largest edit strength over :attr:`~keyscope.editing.base.ModelEdit.layers`."""

    def score(keys: dict[int, torch.Tensor]) -> torch.Tensor:
        per_layer = [edit.strength(keys[layer].float(), layer, request, tau).float() for layer in edit.layers]  # (P,)
        return torch.stack(per_layer, -1).amax(-1, keepdim=True)  # (P, 1)

    return score


def form_strengths(model, edit, probes: Sequence, request: int = 0, tau: float | None = None,
                   batch_size: int = 32) -> torch.Tensor:
    """The edit strength of each probe's key (at its subject's last token) per edited layer:
    ``(n_probes, n_layers)`` float64, layers in :attr:`~keyscope.editing.base.ModelEdit.layers` order."""
    if not probes:
        return torch.zeros((0, len(edit.layers)), dtype=torch.float64)
    columns = []
    for layer in edit.layers:
        keys = probe_keys(model, probes, layer, batch_size=batch_size)  # (n, d_mlp)
        columns.append(edit.strength(keys.float(), layer, request, tau).double().cpu())  # (n,)
    return torch.stack(columns, -1)  # (n, n_layers)


def subject_variants(tokenizer, request, fact: Fact | None = None, rephrasings: Sequence[str] = ()) -> tuple:
    """The token sequences masked for the edited subject: the strict filter of
    :func:`keyscope.analysis.scan.filter_variants` for ``fact`` (or for the request with ``rephrasings``)."""
    if fact is None:
        fact = Fact(None, request.template, request.subject, request.target_new, request.target_true or "",
                    subject_rephrase=tuple(rephrasings))
    return scan.filter_variants(tokenizer, fact)["strict"]


def _forms(probes: Sequence, strengths: torch.Tensor, layers: tuple[int, ...]) -> list[Form]:
    return [Form(p.kind, p.source, p.prompt, p.subject, float(strengths[i].max()),
                 {layer: float(strengths[i, j]) for j, layer in enumerate(layers)}) for i, p in enumerate(probes)]


# ---------------------------------------------------------------------------------------------- analysis


def analyse(model, edit, corpus: Source | Iterable[str], probes: Sequence = (), variants: Sequence | None = None,
            config: ReachConfig | None = None, request: int = 0, progress: bool = True) -> Reach:
    """The predicted reach of request ``request`` of ``edit`` (a :class:`~keyscope.editing.base.ModelEdit`, not
    applied) over the first ``config.n_tokens`` tokens of ``corpus`` (module docstring): the ``top_k``
    unrelated positions, the strengths of ``probes`` (the subject's forms; an ``original`` probe is reported
    apart as the reference edit prompt) and the verdict. ``variants`` are the masked token sequences
    (default: :func:`subject_variants` of the request)."""
    config = config or ReachConfig()
    layers = tuple(edit.layers)
    tokenizer = model.tokenizer
    start = time.perf_counter()
    variants = subject_variants(tokenizer, edit.requests[request]) if variants is None else variants
    strengths = form_strengths(model, edit, probes, request, config.tau)  # (n_probes, n_layers)
    forms = _forms(probes, strengths, layers)
    original = next((f for f in forms if f.kind == ORIGINAL), None)
    perturbed = [f for f in forms if f.kind != ORIGINAL]
    rephrased = [f.strength for f in perturbed if f.kind == REPHRASE]
    reference_kind = "rephrasing" if rephrased else "perturbed form"
    pool = rephrased or [f.strength for f in perturbed]
    reference = float(np.median(pool)) if pool else None
    seconds = {"forms": time.perf_counter() - start}

    start = time.perf_counter()
    scan_config = config.scan_config(layers[-1])
    batches = token_batches(tokenizer, corpus, config.n_tokens, config.seq_len, config.batch_size, config.prepend_bos)
    thresholds = torch.tensor([reference if reference is not None else math.inf])  # (1,)
    result = scan.scan_scores(model, batches, edit_score(edit, request, config.tau), 1, {"strict": [variants]},
                              scan_config, progress=progress, layers=layers, thresholds=thresholds)["strict"]
    seconds["scan"] = time.perf_counter() - start
    top = tuple(Reached(hit.position, hit.prefix, hit.score) for hit in result.neighbours())
    return Reach(layers, top, tuple(perturbed), original, reference, reference_kind,
                 int(result.n_above[0]) if reference is not None else None, result.n_tokens,
                 int(result.n_excluded[0]), seconds=seconds)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` of log-probabilities ``(..., vocab)``: ``(...,)`` float64."""
    log_p, log_q = log_p.double(), log_q.double()
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); ``None`` when undefined (constant input or fewer
    than 3 points)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def _stream_windows(model, corpus, config: ReachConfig, wanted: set[int], variants) -> tuple[dict, torch.Tensor]:
    """One pass over the token windows (no forward pass): ``{position: (window ids, column)}`` for the
    ``wanted`` stream positions and the strict filter's exclusion of every position ``(N,)`` bool."""
    tokenizer = model.tokenizer
    masker = scan.SubjectMask([variants], config.window, lookbehind=True,
                              lag=scan.SubjectMask.longest([variants]) - 1)
    excluded, found, seen = [], {}, 0
    wanted_ids = torch.as_tensor(sorted(wanted), dtype=torch.long)  # (n_wanted,)
    for batch in token_batches(tokenizer, corpus, config.n_tokens, config.seq_len, config.batch_size,
                               config.prepend_bos):
        rows, cols = batch.key_mask.nonzero(as_tuple=True)  # (P,) each, in stream order
        excluded.append(masker(batch.input_ids[batch.key_mask])[:, 0])
        positions = torch.arange(seen, seen + rows.shape[0])  # (P,)
        for i in torch.isin(positions, wanted_ids).nonzero().flatten().tolist():
            row = int(rows[i])
            length = int(batch.attention_mask[row].sum())
            found[seen + i] = (batch.input_ids[row, :length].tolist(), int(cols[i]))
        seen += int(rows.shape[0])
    excluded.append(masker.flush()[:, 0])
    return found, torch.cat(excluded)  # (N,)


@torch.no_grad()
def _measure(model, edit, windows: Sequence[tuple[list[int], int]], config: ReachConfig, request: int):
    """For each ``(window ids, column)``: the per-layer edit strengths of the unedited key there
    ``(n, n_layers)``, the unedited and edited log-probabilities of the next token ``(n, vocab)``."""
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    layers = tuple(edit.layers)
    n = len(windows)
    strengths = torch.zeros((n, len(layers)), dtype=torch.float64)
    before: list[torch.Tensor | None] = [None] * n
    after: list[torch.Tensor | None] = [None] * n
    lengths = [col + 1 for _, col in windows]  # causal: tokens after the column do not change it
    for rows in length_batches(lengths, config.check_batch_size):
        input_ids, mask = pad_batch([windows[i][0][: lengths[i]] for i in rows], pad_id, "right",
                                    device=model.cfg.device)  # (b, pos) each
        cols = torch.as_tensor([windows[i][1] for i in rows], device=input_ids.device)  # (b,)
        index = torch.arange(len(rows), device=input_ids.device)

        def at_columns(activation: torch.Tensor, index=index, cols=cols) -> torch.Tensor:
            return activation.detach()[index, cols].float()  # (b, d_mlp)

        sites = [Site(key_hook(layer), at_columns) for layer in layers]
        with capture(model, sites) as kept:
            logits = model(input_ids, attention_mask=mask, return_type="logits")  # (b, pos, vocab)
        for j, layer in enumerate(layers):
            keys = kept[key_hook(layer)]  # (b, d_mlp)
            strengths[rows, j] = edit.strength(keys, layer, request, config.tau).double().cpu()
        log_p = logits[index, cols].double().log_softmax(-1).cpu()  # (b, vocab)
        with edit.applied(model, config.tau):
            logits = model(input_ids, attention_mask=mask, return_type="logits")  # (b, pos, vocab)
        log_q = logits[index, cols].double().log_softmax(-1).cpu()  # (b, vocab)
        for r, i in enumerate(rows):
            before[i], after[i] = log_p[r], log_q[r]
    vocab = int(model.cfg.d_vocab)
    stack = (lambda xs: torch.stack(xs) if xs else torch.zeros((0, vocab), dtype=torch.float64))  # noqa: E731
    return strengths, stack(before), stack(after)


def check(model, edit, corpus: Source | Iterable[str], reach: Reach, variants: Sequence | None = None,
          config: ReachConfig | None = None, request: int = 0) -> Check:
    """Measure the change the applied edit makes at ``reach.top`` and at as many random unrelated positions
    (module docstring); the edit is applied reversibly and the model's weights are the same on return."""
    config = config or ReachConfig()
    start = time.perf_counter()
    tokenizer = model.tokenizer
    variants = subject_variants(tokenizer, edit.requests[request]) if variants is None else variants
    top_positions = [r.position for r in reach.top]
    if not top_positions:
        raise KeyscopeError("no unrelated corpus position to check (the corpus is empty or all masked)")
    n_random = len(top_positions)
    generator = torch.Generator().manual_seed(config.seed)
    n_pool = min(reach.n_tokens, 2 * n_random + reach.n_excluded)  # enough for n_random valid ones
    pool = torch.randperm(reach.n_tokens, generator=generator)[:n_pool].tolist()
    windows, excluded = _stream_windows(model, corpus, config, set(top_positions) | set(pool), variants)
    taken = set(top_positions)
    random_positions = [p for p in pool if not excluded[p] and p not in taken][:n_random]
    positions = top_positions + random_positions
    strengths, log_p, log_q = _measure(model, edit, [windows[p] for p in positions], config, request)
    kl = kl_divergence(log_p, log_q)  # (n,)
    flipped = log_p.argmax(-1) != log_q.argmax(-1)  # (n,)
    k = len(top_positions)
    random_kl = kl[k:].numpy()
    threshold = float(np.quantile(random_kl, config.changed_quantile)) if random_kl.size else math.inf
    changed = (kl > threshold) | flipped  # (n,)
    best = strengths.amax(-1)  # (n,)

    def decode(i: int) -> str:
        return tokenizer.decode([int(i)])

    def reached(i: int, prefix: str) -> Reached:
        return Reached(positions[i], prefix, float(best[i]),
                       {layer: float(strengths[i, j]) for j, layer in enumerate(edit.layers)}, float(kl[i]),
                       bool(flipped[i]), decode(log_p[i].argmax()), decode(log_q[i].argmax()), bool(changed[i]))

    prefix_of = {r.position: r.prefix for r in reach.top}
    top = tuple(reached(i, prefix_of[positions[i]]) for i in range(k))
    randoms = []
    for i in range(k, len(positions)):
        ids, col = windows[positions[i]]
        first = 1 if prepends_bos(tokenizer, config.prepend_bos) else 0
        prefix = tokenizer.decode(ids[max(first, col - config.prefix_tokens + 1) : col + 1], skip_special_tokens=True)
        randoms.append(reached(i, prefix))

    def median(values) -> float:
        return float(np.median(values)) if len(values) else math.nan

    return Check(top, tuple(randoms), threshold, float(changed[:k].double().mean()),
                 spearman(best.tolist(), kl.tolist()), median(kl[:k].numpy()), median(random_kl),
                 float(flipped[:k].double().mean()), float(flipped[k:].double().mean()) if randoms else math.nan,
                 float(changed[k:].double().mean()) if randoms else math.nan, config.changed_quantile,
                 time.perf_counter() - start)
