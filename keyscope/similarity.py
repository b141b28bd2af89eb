"""Whitened key similarity, ROME's edit strength, and the perturbed prompts whose keys are compared.

A ROME edit at key ``k*`` changes ``W_out`` by ``ΔW = Λ (C⁻¹k*)ᵀ`` with ``Λ`` chosen so that
``ΔW k* = Λ · k*ᵀC⁻¹k*`` installs the new value (Meng et al. 2022, eq. 2). Any other key ``k`` is moved by
``ΔW k = Λ · kᵀC⁻¹k*``, i.e. by the fraction

    s(k; k*) = kᵀC⁻¹k* / k*ᵀC⁻¹k*                                    (normalised edit strength)

of the full edit: ``s = 1`` means ``k`` receives the whole edit, ``s ≈ 0`` that it is untouched. Yan et al.
("Keys to Robust Edits", Sec. 3) measure robustness this way — an edit should reach the keys of the same
subject under rephrasing and long contexts (``s ≈ 1``) but not those of shuffled-token or other subjects
(``s ≈ 0``). The whitened inner product ``k₁ᵀC⁻¹k₂`` takes a fitted
:class:`keyscope.covariance.KeyCovariance`, whose :meth:`~keyscope.covariance.KeyCovariance.solve` is a
Cholesky solve (no explicit inverse). Results are float64.

The perturbation builders turn one fact (a template with ``{}`` and its subject) into :class:`Probe` prompts:
:func:`rephrased_subjects`, :func:`shuffled_subjects`, :func:`long_context` and the
:func:`other_subjects` baseline; :func:`probe_keys` collects their keys. Figures live elsewhere.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from keyscope.keys import SLOT, Encoded, collect_keys, encode, fill, tokens_overlapping

# ---------------------------------------------------------------------------------------------- similarity


def whitened_similarity(key_a: torch.Tensor, key_b: torch.Tensor, cov) -> torch.Tensor:
    """``k_aᵀ C⁻¹ k_b`` for paired keys: ``(d,)·(d,)`` → scalar, ``(n, d)·(n, d)`` → ``(n,)`` (broadcasting)."""
    b_white = cov.solve(key_b)  # (..., d) float64: C⁻¹ k_b
    return (key_a.to(b_white.device, torch.float64) * b_white).sum(-1)


def whitened_similarity_matrix(keys_a: torch.Tensor, keys_b: torch.Tensor | None, cov) -> torch.Tensor:
    """``K_a C⁻¹ K_bᵀ``: ``(n, d)``, ``(m, d)`` → ``(n, m)``; ``keys_b=None`` uses ``keys_a``."""
    keys_b = keys_a if keys_b is None else keys_b
    b_white = cov.solve(keys_b)  # (m, d)
    return keys_a.to(b_white.device, torch.float64) @ b_white.T  # (n, m)


def whitened_norm(key: torch.Tensor, cov) -> torch.Tensor:
    """``sqrt(kᵀ C⁻¹ k)``: ``(d,)`` → scalar, ``(n, d)`` → ``(n,)``."""
    return whitened_similarity(key, key, cov).clamp_min(0).sqrt()


def edit_strength(key: torch.Tensor, k_star: torch.Tensor, cov) -> torch.Tensor:
    """Normalised edit strength ``kᵀC⁻¹k* / k*ᵀC⁻¹k*`` of an edit at ``k_star`` ``(d,)`` on ``key`` ``(d,)``/``(n, d)``."""
    c_inv_k_star = cov.solve(k_star)  # (d,) float64
    k_star64 = k_star.to(c_inv_k_star.device, torch.float64)
    return (key.to(c_inv_k_star.device, torch.float64) @ c_inv_k_star) / (k_star64 @ c_inv_k_star)


def edit_strength_matrix(keys: torch.Tensor, k_stars: torch.Tensor, cov) -> torch.Tensor:
    """``S[i, j] = k_iᵀC⁻¹k*_j / k*_jᵀC⁻¹k*_j`` for keys ``(n, d)`` and edited keys ``(m, d)`` → ``(n, m)``."""
    c_inv_k_stars = cov.solve(k_stars)  # (m, d)
    k_stars64 = k_stars.to(c_inv_k_stars.device, torch.float64)  # (m, d)
    denom = (k_stars64 * c_inv_k_stars).sum(-1)  # (m,)
    return (keys.to(c_inv_k_stars.device, torch.float64) @ c_inv_k_stars.T) / denom  # (n, m)


# ---------------------------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """One prompt to take a key from: a template with one ``{}`` and the subject that fills it.

    ``kind`` is ``original``, ``rephrased``, ``shuffled``, ``long_context`` or ``other_subject``.
    ``exact_tokens`` (shuffles) says whether the decoded text re-tokenises to exactly the shuffled token
    sequence; ``n_context_tokens`` (long context) counts the model tokens of unrelated text before the prompt.
    """

    template: str
    subject: str
    kind: str = "original"
    exact_tokens: bool | None = None
    n_context_tokens: int = 0

    @property
    def prompt(self) -> str:
        return fill(self.template, self.subject).text


def as_template(prompt: str, subject: str) -> str:
    """``prompt`` with a single ``{}`` at the subject occurrence :func:`keyscope.keys.fill` uses."""
    span = fill(prompt, subject)
    return span.text[: span.start] + SLOT + span.text[span.end :]


def probe_keys(model, probes: Sequence[Probe], layer: int, **kwargs) -> torch.Tensor:
    """Layer-``layer`` keys ``(n, d_mlp)`` of ``probes`` (see :func:`keyscope.keys.collect_keys`)."""
    return collect_keys(model, [p.template for p in probes], [p.subject for p in probes], layer, **kwargs)


def rephrased_subjects(template: str, subject: str, rephrasings: Iterable[str]) -> list[Probe]:
    """The fact with each of ``rephrasings`` (aliases, abbreviations…) in the subject slot."""
    template = as_template(template, subject)
    return [Probe(template, r, "rephrased") for r in rephrasings if r.strip() and r != subject]


def other_subjects(template: str, subject: str, pool: Sequence[str], n: int = 10, seed: int = 0) -> list[Probe]:
    """Baseline: up to ``n`` distinct subjects from ``pool`` (not ``subject``) in the same template."""
    template = as_template(template, subject)
    candidates = sorted({s for s in pool if s.strip() and s.strip() != subject.strip()})
    random.Random(seed).shuffle(candidates)
    return [Probe(template, s, "other_subject") for s in candidates[:n]]


def _decode(tokenizer, ids: Sequence[int]) -> str:
    """Text of ``ids``; unknown-token pieces are kept (as ``<unk>``) so re-tokenising can give them back."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _plain(tokenizer, text: str) -> Encoded:
    """``text`` tokenised without BOS/EOS-like special tokens (those with an empty character span)."""
    enc = encode(tokenizer, text, prepend_bos=False)
    keep = [i for i, sp in enumerate(enc.special) if not sp]
    return Encoded(
        text, tuple(enc.ids[i] for i in keep), tuple(enc.offsets[i] for i in keep), tuple(False for _ in keep)
    )


def _candidate_permutations(n_tokens: int, rng: random.Random, max_candidates: int) -> Iterable[tuple[int, ...]]:
    """Distinct non-identity permutations of ``range(n_tokens)``, in random order."""
    identity = tuple(range(n_tokens))
    if math.factorial(n_tokens) <= 5040:
        perms = [p for p in itertools.permutations(identity) if p != identity]
        rng.shuffle(perms)
        yield from perms[:max_candidates]
        return
    seen = {identity}
    for _ in range(max_candidates * 4):
        perm = list(identity)
        rng.shuffle(perm)
        if tuple(perm) not in seen:
            seen.add(tuple(perm))
            yield tuple(perm)


def shuffled_subjects(
    tokenizer,
    template: str,
    subject: str,
    n: int = 10,
    seed: int = 0,
    require_exact: bool = True,
    max_candidates: int = 500,
) -> list[Probe]:
    """Up to ``n`` prompts whose subject tokens are a distinct permutation of the original ones.

    The subject's tokens are those of one tokenisation of the filled prompt (so GPT-2's ``Ġ`` and
    SentencePiece's ``▁`` word-start markers travel with their tokens); a permutation of them (token
    multiset kept, a different token *sequence* — repeated tokens are not counted twice) replaces them and
    the whole sequence is **decoded** with the tokenizer, giving plain text, and the new subject is the
    decoded stretch between the unchanged prefix and suffix.

    Decoding and re-tokenising is exact for whole-word pieces (factworld's word-level tokenizer, most
    BPE words) but not always: a character split over several byte-level tokens (``é`` as two GPT-2
    bytes) cannot be separated; a piece without a word-start marker moved to the front glues onto the
    previous word, where BPE may merge it differently; normalisers may rewrite text. ``exact_tokens`` on
    each probe records whether re-tokenising the decoded prompt gives exactly the shuffled sequence (hence
    the same multiset of subject tokens); with ``require_exact=True`` (default) only those are returned, so
    the model sees the shuffled tokens themselves. Subjects of one token have no shuffle: ``[]``.
    """
    template = as_template(template, subject)
    span = fill(template, subject)
    enc = _plain(tokenizer, span.text)
    hits = tokens_overlapping(enc, span.start, span.end)
    first, last = hits[0], hits[-1]
    ids = list(enc.ids)
    subject_ids = ids[first : last + 1]
    if len(subject_ids) < 2 or len(set(subject_ids)) < 2:
        return []
    prefix_ids, suffix_ids = ids[:first], ids[last + 1 :]
    prefix_text = _decode(tokenizer, prefix_ids)
    rng = random.Random(f"{seed}:{subject}")
    probes: list[Probe] = []
    seen_sequences = {tuple(subject_ids)}
    for perm in _candidate_permutations(len(subject_ids), rng, max_candidates):
        shuffled = [subject_ids[i] for i in perm]
        if tuple(shuffled) in seen_sequences:
            continue
        seen_sequences.add(tuple(shuffled))
        upto_text = _decode(tokenizer, prefix_ids + shuffled)
        full_text = _decode(tokenizer, prefix_ids + shuffled + suffix_ids)
        if not (upto_text.startswith(prefix_text) and full_text.startswith(upto_text)):
            continue  # decoding is not prefix-consistent here: the subject cannot be located
        segment = upto_text[len(prefix_text) :]
        core = segment.strip()
        if not core:
            continue
        lead = segment[: len(segment) - len(segment.lstrip())]
        trail = segment[len(segment.rstrip()) :]
        new_template = prefix_text + lead + SLOT + trail + full_text[len(upto_text) :]
        re_encoded = _plain(tokenizer, fill(new_template, core).text)
        relocated = tokens_overlapping(re_encoded, len(prefix_text) + len(lead), len(prefix_text) + len(lead) + len(core))
        exact = list(re_encoded.ids) == prefix_ids + shuffled + suffix_ids and relocated[-1:] == [last]
        if exact or not require_exact:
            probes.append(Probe(new_template, core, "shuffled", exact_tokens=exact))
        if len(probes) == n:
            break
    return probes


def subject_tokens(tokenizer, template: str, subject: str) -> list[int]:
    """The token ids covering the subject in one tokenisation of the filled prompt."""
    span = fill(template, subject)
    enc = _plain(tokenizer, span.text)
    return [enc.ids[i] for i in tokens_overlapping(enc, span.start, span.end)]


def same_token_multiset(tokenizer, probe: Probe, template: str, subject: str) -> bool:
    """Whether ``probe``'s prompt tokenises to the same multiset of tokens as the original fact's prompt.

    For a shuffle, whose prefix and suffix are unchanged, this is the multiset of the subject's tokens (a
    whitespace-only token at the subject's edge included, which :func:`subject_tokens` leaves out).
    """
    probe_ids = _plain(tokenizer, probe.prompt).ids
    original_ids = _plain(tokenizer, fill(as_template(template, subject), subject).text).ids
    return Counter(probe_ids) == Counter(original_ids)


def count_prefix_tokens(tokenizer, text: str, n_chars: int) -> int:
    """Exact number of model tokens of ``text`` lying entirely in its first ``n_chars`` characters.

    Special tokens (BOS) are not counted; a token straddling the boundary (GPT-2's ``ĠThe`` holding the
    separating space) belongs to what follows.
    """
    enc = _plain(tokenizer, text)
    return sum(1 for s, e in enc.offsets if e > s and e <= n_chars)


def long_context(
    tokenizer,
    template: str,
    subject: str,
    context: str | Iterable[str],
    n_tokens: int = 300,
    separator: str | None = None,
) -> Probe:
    """The fact preceded by ``n_tokens`` model tokens of unrelated text (Yan et al.'s long-context probe).

    ``context`` is a text or an iterable of documents (e.g. ``keyscope.corpus.documents("wikitext-103")``;
    an iterator shared between facts gives each fact fresh text; documents are joined with spaces). Its
    first tokens are decoded and put before the prompt with ``separator``; the number of decoded tokens is
    adjusted until :func:`count_prefix_tokens` counts exactly ``n_tokens`` tokens before the prompt, which
    is recorded in ``n_context_tokens`` (the closest count reached if re-tokenisation never lands on it).

    ``separator=None`` tries ``"\\n"``, ``" "`` and ``"\\n\\n"`` and keeps the first after which the prompt
    tokenises exactly as it does alone (GPT-2's ``The`` after a newline, LLaMA's ``▁The`` after a space), so
    the subject's own tokens are unchanged; if none does, ``" "`` is used.
    """
    template = as_template(template, subject)
    prompt = fill(template, subject).text
    prompt_ids = list(_plain(tokenizer, prompt).ids)
    docs = [context] if isinstance(context, str) else context
    text = ""
    for doc in docs:
        text = f"{text} {doc}" if text else doc
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= n_tokens + 32:
            break
    pool = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not pool:
        raise ValueError("the long-context text is empty")

    def build(m: int, sep: str) -> tuple[str, int, bool]:
        head = _decode(tokenizer, pool[:m]).rstrip("\ufffd").strip() + sep
        ids = list(_plain(tokenizer, head + prompt).ids)
        count = count_prefix_tokens(tokenizer, head + prompt, len(head))
        return head, count, ids[len(ids) - len(prompt_ids) :] == prompt_ids

    separators = [separator] if separator is not None else ["\n", " ", "\n\n"]
    best: tuple[bool, int, str, int] | None = None  # (prompt kept, -|count - n|, head, count)
    for sep in separators:
        m = min(n_tokens, len(pool))
        for _ in range(12):
            head, count, kept = build(m, sep)
            score = (kept, -abs(count - n_tokens), head, count)
            if best is None or score[:2] > best[:2]:
                best = score
            new_m = min(len(pool), max(1, m + n_tokens - count))
            if count == n_tokens or new_m == m:
                break
            m = new_m
        if best[0] and best[3] == n_tokens:
            break
    _, _, head, count = best
    return Probe(head + template, subject, "long_context", n_context_tokens=count)


# ---------------------------------------------------------------------------------------------- study

#: Perturbation kinds of the Figure 3 study, in display order; ``random`` is the other-subject baseline.
STUDY_KINDS = ("rephrase", "shuffle", "long_context", "random")


@dataclass(frozen=True)
class StudyConfig:
    """How many perturbed prompts of each kind a fact gets in :func:`perturbation_study`."""

    n_shuffles: int = 10
    n_long_contexts: int = 3
    long_context_tokens: int = 300
    n_random: int = 10
    seed: int = 0
    batch_size: int = 32


def fact_probes(tokenizer, fact, subject_pool: Sequence[str], context_docs, config: StudyConfig) -> list[Probe]:
    """The original prompt of ``fact`` followed by its rephrased, shuffled, long-context and random probes.

    ``fact`` needs ``prompt`` (a template with ``{}`` or a filled prompt), ``subject`` and
    ``subject_rephrase`` (possibly empty); ``context_docs`` is an iterator of unrelated documents.
    """
    template = as_template(fact.prompt, fact.subject)
    probes = [Probe(template, fact.subject, "original")]
    probes += rephrased_subjects(template, fact.subject, getattr(fact, "subject_rephrase", ()) or ())
    probes += shuffled_subjects(tokenizer, template, fact.subject, n=config.n_shuffles, seed=config.seed)
    probes += [
        long_context(tokenizer, template, fact.subject, context_docs, n_tokens=config.long_context_tokens)
        for _ in range(config.n_long_contexts)
    ]
    probes += other_subjects(template, fact.subject, subject_pool, n=config.n_random, seed=config.seed)
    return probes


_KIND_NAMES = {"rephrased": "rephrase", "shuffled": "shuffle", "long_context": "long_context", "other_subject": "random"}


def perturbation_study(model, facts: Sequence, layer: int, cov, context_docs, config: StudyConfig | None = None,
                       progress: bool = True):
    """Normalised edit strength ``s(k; k_orig) = kᵀC⁻¹k_orig / k_origᵀC⁻¹k_orig`` of every perturbed key of
    every fact against the fact's original key (Yan et al., Sec. 3 and Figure 3).

    Returns ``(rows, keys)``: ``rows`` is a list of dicts (``case_id``, ``subject``, ``kind`` in
    :data:`STUDY_KINDS`, ``prompt``, ``similarity``) and ``keys`` maps ``case_id`` to ``(kinds, keys)``
    with ``keys`` of shape ``(n_probes, d_mlp)`` (original first), for the PCA panel.
    """
    from tqdm.auto import tqdm

    config = config or StudyConfig()
    tokenizer = model.tokenizer
    pool = [f.subject for f in facts]
    rows: list[dict] = []
    keys_by_case: dict = {}
    for fact in tqdm(facts, desc="perturbation keys", disable=not progress):
        probes = fact_probes(tokenizer, fact, pool, context_docs, config)
        keys = probe_keys(model, probes, layer, batch_size=config.batch_size)  # (n_probes, d_mlp)
        strength = edit_strength(keys[1:], keys[0], cov).cpu()  # (n_probes - 1,)
        for probe, s in zip(probes[1:], strength.tolist()):
            rows.append({"case_id": fact.case_id, "subject": fact.subject, "kind": _KIND_NAMES[probe.kind],
                         "prompt": probe.prompt, "similarity": s})
        keys_by_case[fact.case_id] = (["original"] + [_KIND_NAMES[p.kind] for p in probes[1:]], keys.cpu())
    return rows, keys_by_case


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per kind: ``n``, ``mean``, ``median``, ``q10``, ``q90`` of the normalised similarity."""
    import numpy as np

    out: dict[str, dict[str, float]] = {}
    for kind in STUDY_KINDS:
        values = np.array([r["similarity"] for r in rows if r["kind"] == kind], dtype=np.float64)
        if values.size == 0:
            continue
        out[kind] = {
            "n": int(values.size),
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "q10": float(np.quantile(values, 0.1)),
            "q90": float(np.quantile(values, 0.9)),
        }
    return out


def whitened_pca(keys: torch.Tensor, cov, n_components: int = 2) -> torch.Tensor:
    """2-D PCA of ``keys`` ``(n, d)`` in the whitened space ``k̃ = L⁻¹k`` (``C = LLᵀ``), where the Euclidean
    inner product is ``k₁ᵀC⁻¹k₂``; returns ``(n, n_components)`` coordinates."""
    chol = cov.cholesky()  # (d, d) lower-triangular, float64
    white = torch.linalg.solve_triangular(chol, keys.to(chol.device, torch.float64).T, upper=False).T  # (n, d)
    centred = white - white.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # v: (min(n, d), d)
    return (centred @ v[:n_components].T).cpu()  # (n, n_components)
