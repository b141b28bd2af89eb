"""Corpus nearest-neighbour scan: which keys of ordinary text would an edit of a subject reach?

An edit at the subject key ``k*`` moves any other key ``k`` by the fraction (see :mod:`keyscope.analysis.similarity`)

    s(k; k*) = kᵀC⁻¹k* / k*ᵀC⁻¹k*

of the full edit. Yan et al. ("Keys to Robust Edits", Sec. 3, Figure 4) stream a corpus through the model,
score every token position against the edited keys and look at the highest-scoring positions that are
**not** the subject: unrelated contexts whose keys an edit would move almost as much as the subject's own.

For ``S`` subjects with keys ``K* = [k*_1 … k*_S]`` ``(d_mlp, S)`` the scan precomputes ``W = C⁻¹K*``
``(d_mlp, S)`` (Cholesky solves, :meth:`keyscope.analysis.covariance.KeyCovariance.solve`) and the normalisers
``n_j = k*_jᵀC⁻¹k*_j``; a chunk of ``P`` position keys ``K`` ``(P, d_mlp)`` is then scored against every subject
at once by one matrix product, ``raw = K W`` ``(P, S)`` and ``score = raw / n``. Keys come from the forward
pass stopped right after the layer's key (:func:`keyscope.analysis.keys.layer_keys`) on the windows of
:func:`keyscope.data.corpus.token_batches` (BOS and padding excluded).

Exclusion of the subject itself, under two filters (:data:`FILTERS`, :func:`filter_variants`). Wherever one
of a subject's masked token sequences occurs in the token stream (matched across window boundaries), the
position of its last token and the ``window`` positions after it are excluded for that subject (the paper
masks the subject's last token and the following 10). The **paper** filter masks the subject's last token
wherever it occurs; the **strict** filter also masks the whole name, its last word, its rephrased forms and
the subjects the dataset records as related (family members, order twins), from the **first** token of each
occurrence on — so that what survives it is unrelated text, not the inside of a related name. Because a
match is only known at its last token, the scan scores positions ``L − 1`` tokens late (``L`` the longest
masked sequence), holding back that many keys. Both run over the same keys in one pass; excluded positions
score ``-inf``.

Top-k. Each chunk's best ``k`` positions ``(k, S)`` are merged with the running ``(k, S)`` best, so the state
(scores, raw similarities, stream positions and the ``prefix_tokens`` token ids ending at each hit) has a fixed
size whatever the corpus length; prefixes are decoded once at the end. The merged result equals the global top-k under a total order — higher score first, equal scores by earlier stream
position (:func:`best_rows`) — so it does not depend on the chunking.

Several processes (:mod:`keyscope._infra.distributed`, ``torchrun``). Every rank walks the whole token stream (the
tokenizer and the subject masks are cheap) but runs the model only on its batches, ``rank, rank + K, …``
(``world`` of :func:`scan_scores`); each keeps the top-k of its positions, and the states are gathered and
merged by the same total order: the single-process top-k exactly (scores, positions, prefixes and their order),
with the excluded and above-threshold counts summed as integers.

Any score. The streaming core, :func:`scan_scores`, takes any function of a chunk's keys (at one or several
layers, one forward pass stopped after the last) to ``(P, S)`` scores: the linear score above
(:func:`scan_batches`) or the edit strength of any editor, ROME+REP's adapted-key ``α(k̂)`` included
(:mod:`keyscope.evaluation.reach`).

This module is analysis: it does not import editing, evaluation or the CLI.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from keyscope._infra.distributed import SINGLE, ProcessRank, all_gather_object, heartbeat
from keyscope.analysis.keys import collect_keys, layer_keys
from keyscope.data.corpus import Source, TokenBatch, token_batches
from keyscope.data.datasets import Fact
from keyscope.data.prompts import encode, fill, tokens_overlapping
from keyscope.model.capture import Site, run_to
from keyscope.model.models import check_layer, key_hook, sdpa_attention

#: The exclusion filters of a scan (:func:`filter_variants`): the paper's, and a strict one.
FILTERS = ("paper", "strict")


@dataclass(frozen=True)
class ScanConfig:
    """What to scan and how.

    ``layer``: the key layer; ``n_tokens``: counted corpus positions; ``seq_len``/``batch_size``: windows fed to
    the model; ``top_k``: hits kept per subject; ``window``: positions excluded after each subject occurrence's
    last token (that token included, so ``window + 1`` positions); ``prefix_tokens``: tokens of context kept
    for each hit (ending at it); ``prepend_bos``: see :func:`keyscope.data.corpus.prepends_bos`.
    """

    layer: int
    n_tokens: int = 100_000
    seq_len: int = 256
    batch_size: int = 16
    top_k: int = 10
    window: int = 10
    prefix_tokens: int = 20
    prepend_bos: bool | None = None

    def __post_init__(self) -> None:
        for name in ("n_tokens", "seq_len", "batch_size", "top_k", "prefix_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScanConfig.{name} must be positive, not {getattr(self, name)}")
        if self.window < 0:
            raise ValueError(f"ScanConfig.window must be >= 0, not {self.window}")


@dataclass(frozen=True)
class Neighbour:
    """One hit: the ``rank``-th best corpus position for subject ``subject_index``.

    ``score`` is the normalised edit strength ``kᵀC⁻¹k*/k*ᵀC⁻¹k*``, ``raw`` the whitened similarity
    ``kᵀC⁻¹k*``, ``position`` the index in the counted token stream, ``prefix`` the decoded context ending at
    the hit.
    """

    subject_index: int
    subject: str
    rank: int
    score: float
    raw: float
    position: int
    prefix: str


@dataclass(frozen=True, eq=False)
class ScanResult:
    """Top-k corpus neighbours per subject: ``scores``/``raw``/``positions`` are ``(S, k)``, best first; slots
    with no valid position hold ``-inf`` / ``nan`` / ``-1``. ``n_excluded[j]`` counts the positions masked for
    subject ``j``; ``n_tokens`` the positions scanned; ``n_above[j]`` (scans with thresholds,
    :func:`scan_scores`) the unmasked positions scoring above column ``j``'s threshold."""

    config: ScanConfig
    subjects: tuple[str, ...]
    scores: torch.Tensor  # (S, k) float32
    raw: torch.Tensor  # (S, k) float32
    positions: torch.Tensor  # (S, k) int64
    prefixes: tuple[tuple[str, ...], ...]
    n_tokens: int
    n_excluded: torch.Tensor  # (S,) int64
    n_above: torch.Tensor | None = None  # (S,) int64

    def neighbours(self) -> list[Neighbour]:
        """Every valid hit, subject by subject, best first."""
        out = []
        for j, subject in enumerate(self.subjects):
            for rank in range(self.scores.shape[1]):
                if self.positions[j, rank] < 0:
                    break
                out.append(
                    Neighbour(j, subject, rank, float(self.scores[j, rank]), float(self.raw[j, rank]),
                              int(self.positions[j, rank]), self.prefixes[j][rank])
                )
        return out

    def top1(self) -> list[Neighbour | None]:
        """The best hit of each subject (``None`` if it had no valid position)."""
        best: list[Neighbour | None] = [None] * len(self.subjects)
        for hit in self.neighbours():
            if hit.rank == 0:
                best[hit.subject_index] = hit
        return best


# ---------------------------------------------------------------------------------------------- masking


def subject_token_variants(tokenizer, subject: str, prompt: str | None = None) -> tuple[tuple[int, ...], ...]:
    """The token sequences the subject may take in running text: tokenised alone, after a space, and (if
    ``prompt`` is given) as it is tokenised inside the filled prompt. Special tokens are left out."""
    variants: list[tuple[int, ...]] = []
    for text in (subject, " " + subject):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        variants.append(tuple(int(i) for i in ids))
    if prompt is not None:
        span = fill(prompt, subject)
        enc = encode(tokenizer, span.text, prepend_bos=False)
        variants.append(tuple(enc.ids[i] for i in tokens_overlapping(enc, span.start, span.end)))
    return tuple(dict.fromkeys(v for v in variants if v))


class SubjectMask:
    """Streaming exclusion mask: which positions of the token stream are at or just after a subject.

    Called on consecutive chunks of the stream (``(P,)`` token ids), it returns a ``(P', S)`` bool mask, True
    where subject ``j``'s last token lies at most ``window`` positions back — or, with ``lookbehind``, where
    the position lies anywhere from the first token of an occurrence to ``window`` positions after its last.
    Occurrences that straddle two chunks are found (the last ``max_len - 1`` tokens are carried over) and
    masks that run past a chunk's end continue into the next.

    The mask is emitted ``lag`` positions late (``lag`` at least the longest sequence minus one with
    ``lookbehind``, so that a match can still reach back into positions not yet emitted): each call returns the
    rows of the stream from the end of the previous call's rows up to ``lag`` positions before the end of what
    it has seen; :meth:`flush` returns the last ``lag`` rows. State: the tail, the pending rows and one integer
    per subject, all bounded.
    """

    def __init__(self, variants: Sequence[Sequence[Sequence[int]]], window: int, lookbehind: bool = False,
                 lag: int = 0):
        self.window = int(window)
        self.lookbehind = bool(lookbehind)
        self.n_subjects = len(variants)
        self._by_last: dict[int, list[tuple[tuple[int, ...], int]]] = {}
        for j, subject_variants in enumerate(variants):
            for variant in subject_variants:
                variant = tuple(int(i) for i in variant)
                if variant:
                    self._by_last.setdefault(variant[-1], []).append((variant, j))
        self._last_ids = torch.tensor(sorted(self._by_last), dtype=torch.long)  # (n_last,)
        self._tail_len = self.longest(variants) - 1
        if self.lookbehind and lag < self._tail_len:
            raise ValueError(f"a look-behind mask needs lag >= {self._tail_len}, not {lag}")
        self.lag = int(lag)
        self._tail: list[int] = []
        self._offset = 0  # stream index of the next chunk's first token
        self._masked_until = [-1] * self.n_subjects  # last masked stream index per subject
        self._pending = torch.zeros((0, self.n_subjects), dtype=torch.bool)  # (≤ lag, S) rows not yet emitted

    @staticmethod
    def longest(variants: Sequence[Sequence[Sequence[int]]]) -> int:
        """The length of the longest masked token sequence (at least 1)."""
        return max((len(v) for subject_variants in variants for v in subject_variants), default=1) or 1

    def __call__(self, stream_ids: torch.Tensor) -> torch.Tensor:
        stream_ids = stream_ids.reshape(-1).cpu()  # (P,)
        n = int(stream_ids.shape[0])
        pending = self._pending
        held = int(pending.shape[0])
        mask = torch.cat([pending, torch.zeros((n, self.n_subjects), dtype=torch.bool)])  # (held + P, S)
        offset, tail = self._offset, self._tail
        for j, until in enumerate(self._masked_until):  # masks carried over from earlier chunks
            if until >= offset:
                mask[held : held + until - offset + 1, j] = True
        ids = stream_ids.tolist()
        extended = tail + ids
        candidates = torch.isin(stream_ids, self._last_ids).nonzero().flatten().tolist() if self._by_last else []
        for t in candidates:
            e = t + len(tail)  # index in ``extended``
            for variant, j in self._by_last[ids[t]]:
                m = len(variant)
                if e - m + 1 >= 0 and tuple(extended[e - m + 1 : e + 1]) == variant:
                    first = held + t - (m - 1 if self.lookbehind else 0)  # >= 0: held >= min(lag, seen) >= m - 1
                    mask[max(first, 0) : held + t + self.window + 1, j] = True
                    self._masked_until[j] = max(self._masked_until[j], offset + t + self.window)
        self._tail = extended[len(extended) - self._tail_len :] if self._tail_len else []
        self._offset = offset + n
        cut = max(0, int(mask.shape[0]) - self.lag)
        self._pending = mask[cut:]
        return mask[:cut]

    def flush(self) -> torch.Tensor:
        """The rows still pending at the end of the stream: ``(≤ lag, S)``."""
        pending, self._pending = self._pending, self._pending[:0]
        return pending

    def state_size(self) -> int:
        """Number of stored stream tokens, pending rows and counters (constant in the corpus length)."""
        return len(self._tail) + int(self._pending.shape[0]) + len(self._masked_until)


# ---------------------------------------------------------------------------------------------- top-k


def best_rows(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """The rows of the ``k`` best entries of each column of ``scores`` ``(n, S)``: highest score first, and among
    equal scores the lowest stream position (``positions`` ``(n, S)``) first — a total order, so the top-k of a
    stream does not depend on how it is cut into chunks or shared among processes. ``(min(k, n), S)``."""
    by_position = positions.argsort(dim=0, stable=True)  # (n, S)
    by_score = scores.gather(0, by_position).sort(dim=0, descending=True, stable=True).indices  # (n, S)
    return by_position.gather(0, by_score)[: min(k, scores.shape[0])]  # (k, S)


class ScoreTopK:
    """Running top-k of any per-position scores of streamed keys against ``S`` columns (subjects, edits).

    ``score(keys)`` maps a chunk's keys to ``(P, S)`` scores, or to a ``(scores, raw)`` pair of them (``raw``:
    a second quantity kept beside each hit; without one it is the score). :meth:`add` scores a chunk
    (unless given its scores), masks the excluded positions, takes the chunk's top-k and merges it into the
    state; state tensors are ``(k, S)`` (and ``(k, S, prefix_tokens)`` ids). With ``thresholds`` ``(S,)`` it
    also counts, per column, the unmasked positions scoring above the column's threshold (``n_above``).

    A :class:`keyscope.analysis.stats.RunningStat`: :meth:`merge` folds in another shard's top-k, :meth:`state_dict` /
    :meth:`load_state_dict` save and restore the state exactly, and :meth:`all_reduce` merges every rank's.
    """

    def __init__(self, score, n_columns: int, top_k: int, prefix_tokens: int, device=None,
                 thresholds: torch.Tensor | None = None):
        self._score = score
        self.top_k = int(top_k)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.scores = torch.empty((0, n_columns), device=device)  # (k', S)
        self.raw = torch.empty((0, n_columns), device=device)  # (k', S)
        self.positions = torch.empty((0, n_columns), dtype=torch.long, device=device)  # (k', S)
        self.prefix_ids = torch.empty((0, n_columns, prefix_tokens), dtype=torch.long, device=device)  # (k', S, L)
        self.n_excluded = torch.zeros(n_columns, dtype=torch.long)  # (S,)
        self.thresholds = None if thresholds is None else thresholds.to(device, torch.float32)  # (S,)
        self.n_above = None if thresholds is None else torch.zeros(n_columns, dtype=torch.long)  # (S,)

    def score(self, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, raw)`` of a chunk's keys, both ``(P, S)``."""
        scored = self._score(keys)
        scores, raw = scored if isinstance(scored, tuple) else (scored, scored)
        return scores.to(self.scores.device, torch.float32), raw.to(self.scores.device, torch.float32)

    def add(self, keys, excluded: torch.Tensor, positions: torch.Tensor, prefix_ids: torch.Tensor,
            scored: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge a chunk: keys ``(P, d_mlp)``, excluded ``(P, S)`` bool, stream positions ``(P,)``, prefix ids
        ``(P, L)``; ``scored`` is :meth:`score` of the keys when already computed (it is returned for reuse)."""
        device = self.scores.device
        scores, raw = scored if scored is not None else self.score(keys)  # (P, S)
        unmasked = (scores, raw)
        excluded = excluded.to(device)
        self.n_excluded += excluded.sum(0).cpu()
        scores = scores.masked_fill(excluded, float("-inf"))
        if self.thresholds is not None:
            self.n_above += (scores > self.thresholds).sum(0).cpu()
        rows = best_rows(scores, positions.to(device)[:, None].expand_as(scores), self.top_k)  # (k, S)
        best = scores.gather(0, rows)  # (k, S)
        chunk_raw = raw.gather(0, rows)  # (k, S)
        chunk_pos = positions.to(device)[rows]  # (k, S)
        chunk_prefix = prefix_ids.to(device)[rows]  # (k, S, L)
        self._merge_hits(best, chunk_raw, chunk_pos, chunk_prefix)
        return unmasked

    def _merge_hits(self, scores: torch.Tensor, raw: torch.Tensor, positions: torch.Tensor,
                    prefix_ids: torch.Tensor) -> None:
        """Merge candidate hits ``(n, S)`` (and ``(n, S, L)`` prefix ids) into the state: the ``top_k`` best of
        both, in :func:`best_rows` order."""
        all_scores = torch.cat([self.scores, scores.to(self.scores.device)])  # (k' + n, S)
        all_positions = torch.cat([self.positions, positions.to(self.positions.device)])  # (k' + n, S)
        picks = best_rows(all_scores, all_positions, self.top_k)  # (keep, S)
        self.scores = all_scores.gather(0, picks)
        self.raw = torch.cat([self.raw, raw.to(self.raw.device)]).gather(0, picks)
        self.positions = all_positions.gather(0, picks)
        all_prefix = torch.cat([self.prefix_ids, prefix_ids.to(self.prefix_ids.device)])  # (k' + n, S, L)
        self.prefix_ids = all_prefix.gather(0, picks[:, :, None].expand(-1, -1, all_prefix.shape[2]))

    def merge(self, other: ScoreTopK) -> ScoreTopK:
        """Fold ``other``'s state (the top-k of another share of the positions) into this one: the top-k of both
        under the total order of :func:`best_rows`, ``n_excluded`` and ``n_above`` summed; returns self."""
        self._merge_state(other._state())
        return self

    def _state(self) -> dict[str, torch.Tensor | None]:
        return {"scores": self.scores, "raw": self.raw, "positions": self.positions, "prefix_ids": self.prefix_ids,
                "n_excluded": self.n_excluded, "n_above": self.n_above}

    def _merge_state(self, state: dict) -> None:
        self._merge_hits(state["scores"], state["raw"], state["positions"], state["prefix_ids"])
        self.n_excluded = self.n_excluded + state["n_excluded"]
        if self.n_above is not None:
            self.n_above = self.n_above + state["n_above"]

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """A snapshot of the running state on the CPU (later adds replace these tensors or update copies of
        them, never these): ``scores``, ``raw``, ``positions`` ``(k', S)``, ``prefix_ids``
        ``(k', S, L)``, ``n_excluded`` and ``n_above`` ``(S,)`` (``None`` without thresholds)."""
        return {"scores": self.scores.cpu(), "raw": self.raw.cpu(), "positions": self.positions.cpu(),
                "prefix_ids": self.prefix_ids.cpu(), "n_excluded": self.n_excluded.clone(),
                "n_above": None if self.n_above is None else self.n_above.clone()}

    def load_state_dict(self, state: dict) -> ScoreTopK:
        """Restore :meth:`state_dict` output (onto this instance's device; the score function, ``top_k`` and the
        thresholds are the constructor's); returns self."""
        device = self.scores.device
        self.scores, self.raw = state["scores"].to(device), state["raw"].to(device)
        self.positions, self.prefix_ids = state["positions"].to(device), state["prefix_ids"].to(device)
        self.n_excluded = state["n_excluded"].clone()
        self.n_above = None if state["n_above"] is None else state["n_above"].clone()
        return self

    def all_reduce(self, world: ProcessRank) -> ScoreTopK:
        """Merge the states of every rank of ``world`` into this one, in place (a no-op for a single process).

        Each rank's state is the top-k of its share of the positions under the total order of
        :func:`best_rows`, so the top-k of their union is the top-k of the whole stream — the single-process
        state exactly, ties included. ``n_excluded`` and ``n_above`` are integer sums. Returns self.
        """
        if not world.distributed:
            return self
        states = all_gather_object(self.state_dict(), world)
        self.scores, self.raw = self.scores[:0], self.raw[:0]
        self.positions, self.prefix_ids = self.positions[:0], self.prefix_ids[:0]
        self.n_excluded = torch.zeros_like(self.n_excluded)
        if self.n_above is not None:
            self.n_above = torch.zeros_like(self.n_above)
        for state in states:
            self._merge_state(state)
        return self

    def state_nbytes(self) -> int:
        """Bytes held by the running state (bounded by ``top_k``, independent of the corpus length)."""
        tensors = (self.scores, self.raw, self.positions, self.prefix_ids, self.n_excluded)
        return sum(t.numel() * t.element_size() for t in tensors)


class NeighbourTopK(ScoreTopK):
    """Running top-k of the scores of streamed position keys against ``S`` subject keys.

    ``c_inv_k_stars`` is ``C⁻¹K*`` ``(d_mlp, S)`` and ``norms`` the ``k*ᵀC⁻¹k*`` ``(S,)``: a chunk's keys
    ``(P, d_mlp)`` are scored with one matmul, ``raw = K W`` and ``score = raw / n`` (:class:`ScoreTopK`).
    """

    def __init__(self, c_inv_k_stars: torch.Tensor, norms: torch.Tensor, top_k: int, prefix_tokens: int,
                 thresholds: torch.Tensor | None = None):
        self.W = c_inv_k_stars.float()  # (d_mlp, S)
        self.norms = norms.to(self.W.device, torch.float32)  # (S,)
        super().__init__(self._linear, self.W.shape[1], top_k, prefix_tokens, self.W.device, thresholds)

    def _linear(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = keys.to(self.W.device, torch.float32) @ self.W  # (P, S)
        return raw / self.norms, raw


def _prefix_windows(batch: TokenBatch, length: int) -> torch.Tensor:
    """For each counted position, the ``length`` token ids of its window ending at it: ``(P, length)``,
    ``-1`` where the window reaches before the first counted token (BOS, or the window's start)."""
    ids = batch.input_ids.masked_fill(~batch.key_mask, -1)  # (batch, seq)
    padded = torch.nn.functional.pad(ids, (length - 1, 0), value=-1)  # (batch, seq + length - 1)
    windows = padded.unfold(1, length, 1)  # (batch, seq, length)
    return windows[batch.key_mask]  # (P, length)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False)


def scan_batches(
    model,
    batches: Iterable[TokenBatch],
    k_stars: torch.Tensor,
    cov,
    masks: Mapping[str, Sequence[Sequence[Sequence[int]]]],
    config: ScanConfig,
    subjects: Sequence[str] | None = None,
    progress: bool = True,
    world: ProcessRank = SINGLE,
) -> dict[str, ScanResult]:
    """Scan token ``batches`` for the keys most similar to each row of ``k_stars`` ``(S, d_mlp)``, once per
    filter of ``masks``.

    ``cov`` is the layer's fitted :class:`~keyscope.analysis.covariance.KeyCovariance`; ``masks[name][j]`` holds the
    token sequences whose occurrences are excluded for subject ``j`` under filter ``name`` (see
    :func:`filter_variants`). The keys are computed and scored once; each filter keeps its own top-k.
    """
    device = model.cfg.device
    c_inv = cov.solve(k_stars)  # (S, d_mlp) float64
    norms = (k_stars.to(c_inv.device, torch.float64) * c_inv).sum(-1)  # (S,)
    linear = NeighbourTopK(c_inv.T.to(device), norms.to(device), config.top_k, config.prefix_tokens)
    return scan_scores(model, batches, lambda keys: linear.score(keys[config.layer]), k_stars.shape[0], masks,
                       config, subjects, progress, world=world)


def scan_scores(
    model,
    batches: Iterable[TokenBatch],
    score,
    n_columns: int,
    masks: Mapping[str, Sequence[Sequence[Sequence[int]]]],
    config: ScanConfig,
    subjects: Sequence[str] | None = None,
    progress: bool = True,
    layers: Sequence[int] | None = None,
    thresholds: torch.Tensor | None = None,
    world: ProcessRank = SINGLE,
) -> dict[str, ScanResult]:
    """The streaming scan with any score: every counted position of ``batches`` is scored by
    ``score({layer: keys (P, d_mlp)}) -> (P, n_columns)`` (or a ``(scores, raw)`` pair; :class:`ScoreTopK`)
    from its keys at ``layers`` (default ``(config.layer,)``; the forward pass stops after the last of them,
    :func:`keys_at_layers`), and each filter of ``masks`` keeps its own top-k per column (``masks[name][j]``:
    the token sequences excluded for column ``j``). With ``thresholds`` ``(n_columns,)`` each result also counts
    the unmasked positions scoring above them (:attr:`ScanResult.n_above`).

    The edit strength of any editor (``lambda keys: edit.strength(keys[layer])``) scans as
    :func:`scan_batches`' linear score does.
    """
    layers = tuple(check_layer(model, layer) for layer in (layers or (config.layer,)))
    for name, variants in masks.items():
        if len(variants) != n_columns:
            raise ValueError(f"got {n_columns} score columns but {len(variants)} variant lists for {name!r}")
    subjects = tuple(subjects) if subjects is not None else tuple(str(j) for j in range(n_columns))
    device = model.cfg.device
    tops = {name: ScoreTopK(score, n_columns, config.top_k, config.prefix_tokens, device, thresholds)
            for name in masks}
    lookbehind = {name: name == "strict" for name in masks}
    lag = max([SubjectMask.longest(v) - 1 for name, v in masks.items() if lookbehind[name]], default=0)
    maskers = {name: SubjectMask(variants, config.window, lookbehind[name], lag) for name, variants in masks.items()}
    bar = _progress(progress and world.is_main, config.n_tokens, f"scan layer {layers[-1]}" + (
        f" (rank 0 of {world.size})" if world.distributed else ""))
    seen = 0  # stream positions so far (every rank walks the whole token stream)
    emitted = 0  # stream positions whose masks are known
    scored: list[tuple[torch.Tensor, ...]] = []  # this rank's scored positions waiting for their masks

    def consume(excluded: dict[str, torch.Tensor]) -> None:
        """Merge this rank's scored positions among the mask rows just emitted (stream ``emitted`` onwards)."""
        nonlocal emitted, scored
        hi = emitted + int(next(iter(excluded.values())).shape[0])
        waiting = []
        for chunk in scored:
            positions = chunk[2]
            n = int((positions < hi).sum())  # positions ascend: the first n rows have their masks
            if n:
                rows = slice(int(positions[0]) - emitted, int(positions[0]) - emitted + n)
                for name, top in tops.items():
                    top.add(None, excluded[name][rows], positions[:n], chunk[3][:n], (chunk[0][:n], chunk[1][:n]))
            if n < positions.shape[0]:
                waiting.append(tuple(t[n:] for t in chunk))
        scored, emitted = waiting, hi

    try:
        first = next(iter(tops.values()))
        for index, batch in enumerate(batches):
            stream = batch.input_ids[batch.key_mask]  # (P,)
            if index % world.size == world.rank:  # this rank's batch (distributed.shard's striding)
                scores, raw = first.score(keys_at_layers(model, batch, layers))  # (P, S) each
                positions = torch.arange(seen, seen + stream.shape[0])  # (P,)
                scored.append((scores, raw, positions, _prefix_windows(batch, config.prefix_tokens)))
            consume({name: masker(stream) for name, masker in maskers.items()})  # rows up to lag behind
            seen += int(stream.shape[0])
            heartbeat(world, index)  # a rank that failed stops this one here, not at the gather
            if bar is not None:
                bar.update(int(stream.shape[0]))
        consume({name: masker.flush() for name, masker in maskers.items()})
    finally:
        if bar is not None:
            bar.close()
    for top in tops.values():
        top.all_reduce(world)
    return {name: _result(model.tokenizer, top, config, subjects, seen) for name, top in tops.items()}


def keys_at_layers(model, batch: TokenBatch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The keys of a batch's counted positions at each of ``layers``, in stream order: ``{layer: (P, d_mlp)}``.
    One forward pass with SDPA attention, stopped after the last of them (:func:`keyscope.model.capture.run_to`; each
    site keeps only the counted positions), or :func:`layer_keys_of` for a single layer."""
    layers = sorted(set(layers))
    if len(layers) == 1:
        return {layers[0]: layer_keys_of(model, batch, layers[0])}
    device = model.cfg.device
    mask = batch.key_mask.to(device)  # (batch, pos)
    sites = [Site(key_hook(layer), lambda activation: activation.detach()[mask]) for layer in layers]
    with torch.no_grad(), sdpa_attention(model):
        kept = run_to(model, batch.input_ids.to(device), sites, batch.attention_mask.to(device))
    return {layer: kept[key_hook(layer)] for layer in layers}  # (P, d_mlp) each


def layer_keys_of(model, batch: TokenBatch, layer: int) -> torch.Tensor:
    """The layer-``layer`` keys of a batch's counted positions, in stream order: ``(P, d_mlp)``.

    No attention pattern is read, so attention runs through the fused SDPA kernel
    (:func:`keyscope.model.models.sdpa_attention`; the same keys as eager attention to float rounding)."""
    with sdpa_attention(model):
        keys = layer_keys(model, batch.input_ids, batch.attention_mask, layer)  # (batch, seq, d_mlp)
    return keys[batch.key_mask.to(keys.device)]  # (P, d_mlp)


def _result(tokenizer, topk: ScoreTopK, config: ScanConfig, subjects: tuple[str, ...], n_tokens: int) -> ScanResult:
    k = config.top_k
    n_subjects = len(subjects)
    found = topk.scores.shape[0]
    scores = torch.full((n_subjects, k), float("-inf"))  # (S, k)
    raw = torch.full((n_subjects, k), float("nan"))  # (S, k)
    positions = torch.full((n_subjects, k), -1, dtype=torch.long)  # (S, k)
    valid = torch.isfinite(topk.scores).T.cpu()  # (S, found)
    scores[:, :found] = topk.scores.T.cpu()
    raw[:, :found] = torch.where(valid, topk.raw.T.cpu(), torch.nan)
    positions[:, :found] = torch.where(valid, topk.positions.T.cpu(), -1)
    prefix_ids = topk.prefix_ids.permute(1, 0, 2).cpu().tolist()  # (S, found, L)
    prefixes = tuple(
        tuple(
            tokenizer.decode([i for i in prefix_ids[j][r] if i >= 0], skip_special_tokens=True) if valid[j, r] else ""
            for r in range(found)
        )
        + ("",) * (k - found)
        for j in range(n_subjects)
    )
    return ScanResult(config, subjects, scores, raw, positions, prefixes, n_tokens, topk.n_excluded.clone(),
                      None if topk.n_above is None else topk.n_above.clone())


def sample_corpus_keys(model, corpus: Source | Iterable[str], layer: int, n_keys: int = 512, n_tokens: int = 20_000,
                       seed: int = 0, seq_len: int = 128, batch_size: int = 16) -> torch.Tensor:
    """``n_keys`` layer-``layer`` keys of ordinary text: positions drawn uniformly (with ``seed``) from the
    first ``n_tokens`` counted tokens of ``corpus``, float32 ``(n_keys, d_mlp)`` (fewer if the corpus is
    shorter). Streams the batches and keeps only the drawn positions."""
    check_layer(model, layer)
    if n_keys < 1:
        raise ValueError(f"n_keys must be positive, not {n_keys}")
    generator = torch.Generator().manual_seed(seed)
    wanted = torch.randperm(n_tokens, generator=generator)[:n_keys].sort().values  # (n_keys,) stream positions
    picked: list[torch.Tensor] = []
    seen = 0
    for batch in token_batches(model.tokenizer, corpus, n_tokens, seq_len=seq_len, batch_size=batch_size):
        keys = layer_keys_of(model, batch, layer)  # (P, d_mlp)
        inside = wanted[(wanted >= seen) & (wanted < seen + keys.shape[0])] - seen
        picked.append(keys[inside.to(keys.device)].float())
        seen += keys.shape[0]
    return torch.cat(picked)  # (n_keys, d_mlp)


def subject_keys(model, facts: Sequence[Fact], layer: int, batch_size: int = 32) -> torch.Tensor:
    """The edited keys ``k*`` of ``facts``: layer-``layer`` keys at each subject's last token, ``(S, d_mlp)``."""
    return collect_keys(model, [f.prompt for f in facts], [f.subject for f in facts], layer, batch_size=batch_size)


def filter_variants(tokenizer, fact: Fact) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The token sequences masked for ``fact``'s subject under each of :data:`FILTERS`.

    * ``paper`` — the subject's **last token** (of each of :func:`subject_token_variants`): a position whose
      window of ``window`` preceding tokens holds it is dropped, as the paper drops prefixes containing the
      subject's last token;
    * ``strict`` — also the subject's whole name, its last word, its rephrased forms and the subjects the
      dataset records as related to it (``similar_subjects``: factworld's family, which shares the last word;
      ``order_twins``: the same words in another order): none of those is unrelated text.
    """
    names = subject_token_variants(tokenizer, fact.subject, fact.prompt)
    paper = tuple(dict.fromkeys((v[-1],) for v in names))
    extras = fact.extras or {}
    related = [fact.subject.split()[-1], *fact.subject_rephrase, *extras.get("similar_subjects", ()),
               *extras.get("order_twins", ())]
    strict = [*paper, *names]
    for form in related:
        if isinstance(form, str) and form.strip():
            strict += subject_token_variants(tokenizer, form.strip())
    return {"paper": paper, "strict": tuple(dict.fromkeys(strict))}


def scan_corpus(
    model,
    facts: Sequence[Fact],
    cov,
    corpus: Source | Iterable[str],
    config: ScanConfig,
    progress: bool = True,
    k_stars: torch.Tensor | None = None,
    filters: Sequence[str] = FILTERS,
    world: ProcessRank = SINGLE,
) -> dict[str, ScanResult]:
    """Scan ``config.n_tokens`` positions of ``corpus`` for each fact subject's nearest keys (module docstring),
    under each of ``filters`` (:func:`filter_variants`): ``{filter: ScanResult}``.

    ``k_stars`` ``(S, d_mlp)`` defaults to :func:`subject_keys` of ``facts``.
    """
    unknown = sorted(set(filters) - set(FILTERS))
    if unknown:
        raise ValueError(f"unknown scan filter(s) {unknown}; choose from {FILTERS}")
    tokenizer = model.tokenizer
    if k_stars is None:
        k_stars = subject_keys(model, facts, config.layer)  # (S, d_mlp)
    per_fact = [filter_variants(tokenizer, f) for f in facts]
    masks = {name: [variants[name] for variants in per_fact] for name in filters}
    batches = token_batches(tokenizer, corpus, config.n_tokens, config.seq_len, config.batch_size, config.prepend_bos)
    return scan_batches(model, batches, k_stars, cov, masks, config, [f.subject for f in facts], progress, world)
