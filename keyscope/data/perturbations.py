"""Perturbed prompts of a fact: the probes whose keys are compared with the edited key.

Yan et al. ("Keys to Robust Edits", Sec. 3) ask whether an edit of a subject reaches the subject's keys under
perturbations of the prompt. One place builds every such probe, for every study (Figure 3, Figure 5, Table 1, the lemmas,
``keyscope edit``); :data:`KINDS` enumerates them:

* ``rephrase`` — a rephrased form of the subject (an alias, an abbreviation…) in the subject slot;
* ``shuffle`` — the subject's **tokens** in another order (the paper's "random orderings of tokens in the
  subject"), decoded to text (:func:`shuffled_subjects`);
* ``shuffle_words`` — the subject's **words** in another order (:func:`word_shuffled_subjects`);
* ``long`` — the prompt after ``long_context_tokens`` tokens of other text (:func:`long_context`);

and besides them the ``original`` prompt, ``template`` probes (the subject under the fact's paraphrase
templates, REP's extra positives) and the ``random`` baseline (other subjects in the same template).

In-domain and out-of-domain: leave-kind-out
-------------------------------------------
Each probe records its ``source`` — the rephrase kind it is (``title``, ``initials``…; ``#i`` for datasets
that do not name kinds), the form that was shuffled (``canonical`` or a rephrase kind), the text before a long
context (``corpus`` or ``facts``). :func:`fact_probes` splits every kind by **whole sources** into an
in-domain half (what REP trains on) and an out-of-domain half it never sees:

* rephrase: the kinds of :attr:`PerturbationConfig.ood_rephrase_kinds` (word-order variants, initials,
  descriptors, "title + surname of first name", reversed prefixes) are out-of-domain, the rest (title, prefix,
  suffix, place, short form) in-domain; without kinds, the second half of the list is out-of-domain (REP's
  released code trains on the first half);
* shuffle and shuffle_words: shuffles of the subject itself are in-domain, shuffles of the out-of-domain
  rephrased forms are out-of-domain;
* long: contexts of unrelated corpus text are in-domain, contexts made of *other facts'* sentences
  (:func:`fact_documents`) out-of-domain.

A shuffle that spells another subject of the dataset (an order twin in factworld) is not a perturbation of
this subject: builders skip any form in ``exclude``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

from keyscope._infra.errors import KeyscopeError
from keyscope.data.corpus import ContextSource
from keyscope.data.prompts import SLOT, Encoded, encode, fill, tokens_overlapping

ORIGINAL, TEMPLATE, RANDOM = "original", "template", "random"
REPHRASE, SHUFFLE, SHUFFLE_WORDS, LONG = "rephrase", "shuffle", "shuffle_words", "long"
#: The perturbation kinds, in display order (each reported in-domain and out-of-domain in Table 1).
KINDS = (REPHRASE, SHUFFLE, SHUFFLE_WORDS, LONG)
#: Sources of shuffles and long contexts (rephrases are sourced by their rephrase kind).
CANONICAL, CORPUS, FACTS = "canonical", "corpus", "facts"
#: Rephrase kinds held out of REP's training (factworld's :data:`~keyscope.factworld.world.ALIAS_KINDS`).
OOD_REPHRASE_KINDS = ("word_order", "initials", "descriptor", "title_short", "reversed_prefix")


@dataclass(frozen=True)
class Probe:
    """One prompt to take a key from: a template with one ``{}`` and the subject that fills it.

    ``kind`` is one of :data:`KINDS`, ``original``, ``template`` or ``random``; ``source`` what it was made
    from (module docstring). ``exact_tokens`` (shuffles) says whether the decoded text re-tokenises to exactly
    the shuffled token sequence; ``n_context_tokens`` (long contexts) counts the model tokens of text before
    the prompt.
    """

    template: str
    subject: str
    kind: str = ORIGINAL
    source: str = ""
    exact_tokens: bool | None = None
    n_context_tokens: int = 0

    @property
    def prompt(self) -> str:
        return fill(self.template, self.subject).text


def rephrased_subjects(template: str, subject: str, rephrasings: Iterable[str],
                       kinds: Sequence[str] | None = None) -> list[Probe]:
    """The fact with each of ``rephrasings`` (aliases, abbreviations…) in the subject slot; ``kinds[i]`` is
    rephrasing ``i``'s kind (its ``source``; ``#i`` without kinds)."""
    template = fill(template, subject).template
    rephrasings = list(rephrasings)
    sources = list(kinds) if kinds is not None and len(kinds) == len(rephrasings) else [f"#{i}" for i in range(len(rephrasings))]
    return [Probe(template, r, REPHRASE, source) for r, source in zip(rephrasings, sources) if r.strip() and r != subject]


def other_subjects(template: str, subject: str, pool: Sequence[str], n: int = 10, seed: int = 0) -> list[Probe]:
    """Baseline: up to ``n`` distinct subjects from ``pool`` (not ``subject``) in the same template."""
    template = fill(template, subject).template
    candidates = sorted({s for s in pool if s.strip() and s.strip() != subject.strip()})
    random.Random(seed).shuffle(candidates)
    return [Probe(template, s, RANDOM) for s in candidates[:n]]


def word_shuffled_subjects(template: str, subject: str, n: int = 10, seed: int = 0,
                           exclude: Collection[str] = frozenset(), source: str = CANONICAL) -> list[Probe]:
    """Up to ``n`` prompts with the subject's whitespace-separated **words** in another order (no form of
    ``exclude``), drawn with ``seed``; ``[]`` for a one-word subject or ``n = 0``."""
    template = fill(template, subject).template
    words = subject.split()
    if len(words) < 2 or n < 1:
        return []
    rng = random.Random(f"{seed}:words:{subject}")
    forms = []
    for perm in _candidate_permutations(len(words), rng, max(50, 4 * n)):
        form = " ".join(words[i] for i in perm)
        if form != subject and form not in exclude and form not in forms:
            forms.append(form)
        if len(forms) == n:
            break
    return [Probe(template, form, SHUFFLE_WORDS, source) for form in forms]


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
    exclude: Collection[str] = frozenset(),
    source: str = CANONICAL,
) -> list[Probe]:
    """Up to ``n`` prompts whose subject tokens are a distinct permutation of the original ones.

    The subject's tokens are those of one tokenisation of the filled prompt (so GPT-2's ``Ġ`` and
    SentencePiece's ``▁`` word-start markers travel with their tokens); a permutation of them (token
    multiset kept, a different token *sequence* — repeated tokens are not counted twice) replaces them and
    the whole sequence is **decoded** with the tokenizer, giving plain text, and the new subject is the
    decoded stretch between the unchanged prefix and suffix.

    Decoding and re-tokenising is exact for whole-word pieces (word-level tokenizers, most
    BPE words) but not always: a character split over several byte-level tokens (``é`` as two GPT-2
    bytes) cannot be separated; a piece without a word-start marker moved to the front glues onto the
    previous word, where BPE may merge it differently; normalisers may rewrite text. ``exact_tokens`` on
    each probe records whether re-tokenising the decoded prompt gives exactly the shuffled sequence (hence
    the same multiset of subject tokens); with ``require_exact=True`` (default) only those are returned, so
    the model sees the shuffled tokens themselves. A shuffle that spells a form in ``exclude`` (another
    subject's name: an order twin's) is skipped. Subjects of one token have no shuffle, and ``n = 0`` asks for
    none: ``[]``.
    """
    template = fill(template, subject).template
    span = fill(template, subject)
    enc = _plain(tokenizer, span.text)
    hits = tokens_overlapping(enc, span.start, span.end)
    first, last = hits[0], hits[-1]
    ids = list(enc.ids)
    subject_ids = ids[first : last + 1]
    if n < 1 or len(subject_ids) < 2 or len(set(subject_ids)) < 2:
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
        if not core or core in exclude:
            continue
        lead = segment[: len(segment) - len(segment.lstrip())]
        trail = segment[len(segment.rstrip()) :]
        new_template = prefix_text + lead + SLOT + trail + full_text[len(upto_text) :]
        re_encoded = _plain(tokenizer, fill(new_template, core).text)
        relocated = tokens_overlapping(re_encoded, len(prefix_text) + len(lead), len(prefix_text) + len(lead) + len(core))
        exact = list(re_encoded.ids) == prefix_ids + shuffled + suffix_ids and relocated[-1:] == [last]
        if exact or not require_exact:
            probes.append(Probe(new_template, core, SHUFFLE, source, exact_tokens=exact))
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
    original_ids = _plain(tokenizer, fill(fill(template, subject).template, subject).text).ids
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
    context: str | ContextSource | Iterable[str],
    n_tokens: int = 300,
    separator: str | None = None,
    source: str = CORPUS,
) -> Probe:
    """The fact preceded by ``n_tokens`` model tokens of unrelated text (Yan et al.'s long-context probe).

    ``context`` is a text, or a :class:`~keyscope.data.corpus.ContextSource` (or any corpus source or iterable of
    documents, read through one) from which the context takes its own text, ``n_tokens`` tokens and a few to
    spare: one source shared between facts gives every context of a run text of its own, and says when the
    corpus runs out (a corpus shorter than one context is :class:`~keyscope._infra.errors.EmptyCorpus`). Its first
    tokens are decoded and put before the prompt with ``separator``; the number of decoded tokens is adjusted
    until :func:`count_prefix_tokens` counts exactly ``n_tokens`` tokens before the prompt, which is recorded
    in ``n_context_tokens`` (the closest count reached if re-tokenisation never lands on it; fewer when a
    literal ``context`` text is shorter).

    ``separator=None`` tries ``"\\n"``, ``" "`` and ``"\\n\\n"`` and keeps the first after which the prompt
    tokenises exactly as it does alone (GPT-2's ``The`` after a newline, LLaMA's ``▁The`` after a space), so
    the subject's own tokens are unchanged; if none does, ``" "`` is used.
    """
    template = fill(template, subject).template
    prompt = fill(template, subject).text
    prompt_ids = list(_plain(tokenizer, prompt).ids)
    text = context if isinstance(context, str) else ContextSource.of(context).take(tokenizer, n_tokens, 32)
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
    return Probe(head + template, subject, LONG, source, n_context_tokens=count)


def fact_documents(facts: Sequence, seed: int | str = 0, sentences: int = 40, exclude_subject: str | None = None
                   ) -> Iterator[str]:
    """An endless seeded stream of documents made of facts' sentences (prompt + true target), the
    out-of-domain source of long contexts: text of the same kind as the edited prompt, about other subjects
    (never about ``exclude_subject``)."""
    rng = random.Random(f"fact-documents-{seed}")
    usable = [f for f in facts if f.target_true and f.subject != exclude_subject]
    if not usable:
        raise KeyscopeError("no facts with a true target to build fact documents from")
    while True:
        picked = [rng.choice(usable) for _ in range(sentences)]
        yield " ".join(f"{f.filled_prompt.rstrip()} {f.target_true.strip()} ." for f in picked)


# ---------------------------------------------------------------------------------------------- one fact


@dataclass(frozen=True)
class PerturbationConfig:
    """How many probes of each kind a fact gets and which sources are out-of-domain. No I/O.

    ``n_rephrase`` caps the rephrased subjects taken, in the dataset's order (``None``: all of them);
    ``n_shuffles``/``n_word_shuffles`` count the in-domain shuffles of the subject itself; each out-of-domain
    rephrased form adds one of each (up to the same counts). ``n_long_contexts`` is per source.
    ``out_of_domain=False`` holds nothing out: every rephrase is in-domain, in the dataset's order, and the
    out-of-domain halves are empty (``keyscope edit`` and Figure 5 show every rephrase of the subject).

    Each study parametrises this one config: Table 1 and the bounds take the defaults (with their seed),
    Figure 3 too; ``keyscope edit`` one long context and no held-out half
    (:func:`keyscope.studies.edit.edit_probes`); Figures 4 and 5 the rephrases alone (:data:`REPHRASES`).
    """

    n_rephrase: int | None = 10
    n_shuffles: int = 6
    n_word_shuffles: int = 4
    n_long_contexts: int = 3
    long_context_tokens: int = 300
    n_random: int = 10
    ood_rephrase_kinds: tuple[str, ...] = OOD_REPHRASE_KINDS
    seed: int = 0
    out_of_domain: bool = True

    def __post_init__(self):
        for name in ("n_rephrase", "n_shuffles", "n_word_shuffles", "n_long_contexts", "long_context_tokens", "n_random"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"PerturbationConfig.{name} must be >= 0, not {getattr(self, name)}")


#: The query protocol of the paper's Table 1 (Yan et al., "Keys to Robust Edits", §5): per fact 5 in-domain and 5
#: out-of-domain queries of each kind — the 10 rephrased subjects split 5/5, 5 token and 5 word shuffles of the
#: subject in-domain and one of each of the 5 held-out rephrased forms out of domain, 5 long contexts of corpus
#: text in-domain and 5 of other facts' sentences out of domain. ``PerturbationConfig()`` is keyscope's default
#: (6 + 4 shuffles, 3 + 3 long contexts).
PROTOCOLS: dict[str, PerturbationConfig] = {
    "keyscope": PerturbationConfig(),
    "paper": PerturbationConfig(n_rephrase=10, n_shuffles=5, n_word_shuffles=5, n_long_contexts=5),
}


#: Every rephrased subject of a fact, none held out, and no other perturbation: the rephrase probes of Figure 5
#: (:mod:`keyscope.studies.values`) and of Figure 4's scale (:func:`keyscope.studies.scan.rephrase_scores`).
REPHRASES = PerturbationConfig(n_rephrase=None, n_shuffles=0, n_word_shuffles=0, n_long_contexts=0, n_random=0,
                               out_of_domain=False)


@dataclass(frozen=True)
class FactProbes:
    """The probes of one fact: ``perturbed[kind] = (in_domain, out_of_domain)`` for each of :data:`KINDS`,
    the subject under the paraphrase templates, and the random-subject baseline."""

    fact: object
    original: Probe
    perturbed: dict[str, tuple[tuple[Probe, ...], tuple[Probe, ...]]]
    templates: tuple[Probe, ...]
    random: tuple[Probe, ...] = ()

    def training_probes(self) -> list[Probe]:
        """REP's positives: the in-domain half of every kind plus the paraphrase templates."""
        return [p for kind in KINDS for p in self.perturbed[kind][0]] + list(self.templates)

    def all(self) -> list[Probe]:
        """The original, then every perturbed probe (in-domain before out-of-domain, kind by kind), then the
        random baseline."""
        return [self.original, *(p for kind in KINDS for half in self.perturbed[kind] for p in half), *self.random]


def rephrase_kinds(fact) -> list[str] | None:
    """The rephrase kinds of ``fact.subject_rephrase`` when the dataset names them (factworld's export)."""
    kinds = (getattr(fact, "extras", None) or {}).get("subject_rephrase_kind")
    if isinstance(kinds, (list, tuple)) and len(kinds) == len(fact.subject_rephrase):
        return [str(k) for k in kinds]
    return None


def fact_probes(tokenizer, fact, context_docs: ContextSource | Iterable[str] | None,
                config: PerturbationConfig | None = None, exclude: Collection[str] = frozenset(),
                other_facts: Sequence | None = None, subject_pool: Sequence[str] = ()) -> FactProbes:
    """Every probe of ``fact`` (``prompt``, ``subject``, ``subject_rephrase``, ``paraphrase_prompts``), split
    in-domain / out-of-domain by whole sources (module docstring).

    ``context_docs`` gives the unrelated text of the in-domain long contexts: a
    :class:`~keyscope.data.corpus.ContextSource` that the run's facts share (each long context takes text of its
    own), or documents read through one for this fact alone; the out-of-domain long contexts are made of the
    sentences of ``other_facts`` (:func:`fact_documents`, seeded by the fact, never about its own subject).
    ``None`` leaves a source out. ``exclude`` holds forms that name other subjects; ``subject_pool`` feeds the
    random baseline.
    """
    config = config or PerturbationConfig()
    template = fill(fact.prompt, fact.subject).template
    subject = fact.subject
    exclude = frozenset(exclude) - {subject}
    rephrasings = list(fact.subject_rephrase)[: config.n_rephrase]
    kinds = rephrase_kinds(fact)
    rephrased = rephrased_subjects(template, subject, rephrasings, kinds[: len(rephrasings)] if kinds else None)
    if not config.out_of_domain:
        ood_rephrase = []
    elif kinds is not None:
        ood_rephrase = [p for p in rephrased if p.source in config.ood_rephrase_kinds]
    else:
        half = math.ceil(len(rephrased) / 2)
        ood_rephrase = rephrased[half:]
    id_rephrase = [p for p in rephrased if p not in ood_rephrase]

    def shuffles(builder, n: int) -> tuple[tuple[Probe, ...], tuple[Probe, ...]]:
        if n == 0:
            return (), ()
        in_domain = builder(subject, n, CANONICAL)
        out_of_domain: list[Probe] = []
        for probe in ood_rephrase:
            if len(out_of_domain) >= n:
                break
            out_of_domain += builder(probe.subject, 1, probe.source)
        return tuple(in_domain), tuple(out_of_domain)

    def token_shuffles(form: str, n: int, source: str) -> list[Probe]:
        return shuffled_subjects(tokenizer, template, form, n=n, seed=config.seed, exclude=exclude, source=source)

    def word_shuffles(form: str, n: int, source: str) -> list[Probe]:
        return word_shuffled_subjects(template, form, n=n, seed=config.seed, exclude=exclude, source=source)

    def longs(docs, source: str) -> tuple[Probe, ...]:
        if docs is None or not config.long_context_tokens:
            return ()
        contexts = ContextSource.of(docs)
        return tuple(long_context(tokenizer, template, subject, contexts, n_tokens=config.long_context_tokens,
                                  source=source) for _ in range(config.n_long_contexts))

    fact_docs = None
    if other_facts and config.out_of_domain:
        fact_docs = fact_documents(other_facts, seed=f"{config.seed}:{fact.case_id}", exclude_subject=subject)
    templates = []
    for prompt in fact.paraphrase_prompts:
        try:
            templates.append(Probe(fill(prompt, subject).template, subject, TEMPLATE))
        except KeyscopeError:  # a paraphrase that does not name the subject verbatim
            continue
    perturbed = {
        REPHRASE: (tuple(id_rephrase), tuple(ood_rephrase)),
        SHUFFLE: shuffles(token_shuffles, config.n_shuffles),
        SHUFFLE_WORDS: shuffles(word_shuffles, config.n_word_shuffles),
        LONG: (longs(context_docs, CORPUS), longs(fact_docs, FACTS)),
    }
    random_probes = other_subjects(template, subject, subject_pool, n=config.n_random, seed=config.seed) if subject_pool else []
    return FactProbes(fact, Probe(template, subject, ORIGINAL), perturbed, tuple(templates), tuple(random_probes))


def subject_forms(facts: Iterable) -> frozenset[str]:
    """Every subject name and rephrased form of ``facts`` (what a shuffle must not spell)."""
    forms: set[str] = set()
    for fact in facts:
        forms.add(fact.subject.strip())
        forms.update(r.strip() for r in fact.subject_rephrase if r.strip())
    return frozenset(forms)
