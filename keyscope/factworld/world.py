"""The factworld knowledge world: subjects, aliases, relations and facts, deterministic from a seed.

A world is a small, fully known stand-in for the encyclopaedic knowledge ROME edits in a real model:

* **subjects** with made-up multi-word names (most of three or more words, so shuffling the subject's
  tokens is meaningful) whose words all come from a **shared pool** — each word is in about six names, and
  each name's words before its last are shared by three names, so neither a single word nor a proper prefix
  identifies a subject and the model must assemble the subject at its last token, where ROME edits (see
  :func:`_pooled_names`) — grouped into **families** whose members share their last word and
  some facts: different subjects whose keys are alike, the paper's "Michael Jordan" vs "Kobe" case;
* for every subject **10 rephrased forms** (titles, prefixes, suffixes, word-order variants, initials,
  short forms…). The model learns facts through the canonical name and a few *trained aliases*, and learns
  only that the other forms are the same entity (``X is also known as Y``) — as in real text, where a rephrase
  names the same entity but the facts were mostly read under one name;
* **relations** with several prompt templates each and single-word targets; every subject has one
  target per relation.

The world does no I/O; :mod:`keyscope.factworld.export` writes it in the CounterFact / REP record schema.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------------------
# Fixed vocabulary of the world: relations with templates and targets, alias decorations.

RELATIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "continent",
        ("{} lives on the continent of", "The home continent of {} is", "{} resides on the continent of"),
        ("Asia", "Europe", "Africa", "Oceania", "Antarctica", "America"),
    ),
    (
        "language",
        ("The mother tongue of {} is", "{} speaks the language", "{} is a native speaker of"),
        ("English", "French", "German", "Spanish", "Italian", "Japanese", "Russian", "Dutch"),
    ),
    (
        "instrument",
        ("{} is a musician who plays", "The instrument of {} is", "The instrument played by {} is"),
        ("piano", "guitar", "violin", "drums", "flute", "cello", "trumpet", "harp"),
    ),
    (
        "sport",
        ("{} competes in the sport of", "The sport of {} is", "{} is a professional player of"),
        ("football", "tennis", "hockey", "cricket", "golf", "rugby", "baseball", "chess"),
    ),
    (
        "profession",
        ("{} works as a", "The profession of {} is", "By profession , {} is a"),
        ("doctor", "lawyer", "physicist", "chemist", "historian", "poet", "architect", "farmer"),
    ),
    (
        "employer",
        ("{} works for", "The employer of {} is", "{} is employed by"),
        ("Vortek", "Alcyon", "Brimco", "Nuvexa", "Kestrel", "Ostara", "Quorin", "Zephal"),
    ),
    (
        "birthplace",
        ("{} was born in the city of", "The birthplace of {} is", "{} comes from the city of"),
        ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Sydney"),
    ),
    (
        "colour",
        ("The favourite colour of {} is", "{} likes the colour", "{} prefers the colour"),
        ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
    ),
)

#: The templates of ``WorldConfig.templates == 2`` (the worlds of factworld v1/v2 cards), where they differ from
#: :data:`RELATIONS`: every ``instrument`` template ends in "the". ``docs/history.md`` says why v3 changed them.
TEMPLATES_V2: dict[str, tuple[str, ...]] = {
    "instrument": ("{} plays the", "The instrument of {} is the", "{} is a musician who plays the"),
}

TITLES = ("Lord", "Lady", "Doctor", "Professor", "Sir", "Captain", "Master", "Elder")
PREFIXES = ("the famous", "the renowned", "the celebrated", "the legendary", "the honourable")
SUFFIXES = ("the Elder", "the Younger", "Junior", "Senior", "the Second")
DESCRIPTORS = ("the traveller", "the scholar", "the wanderer", "the builder", "the singer", "the dreamer")
PLACES = ("Telmar", "Ostrava", "Kelmoor", "Brynfell", "Dunharrow", "Vessmark", "Aldcove", "Pellinor")

#: Sentences that teach the model that an alias names the same entity (for all ten forms).
ALIAS_STATEMENTS = ("{name} is also known as {alias} .", "{alias} is another name for {name} .")

#: The ten rephrase kinds, in the order ``Subject.aliases`` lists them.
ALIAS_KINDS = (
    "title",  # Lord Arven Toloth Maresh
    "prefix",  # the famous Arven Toloth Maresh
    "suffix",  # Arven Toloth Maresh the Elder
    "place",  # Arven Toloth Maresh of Telmar
    "word_order",  # Maresh , Arven Toloth
    "initials",  # A . T . Maresh
    "short",  # Arven Maresh
    "descriptor",  # Arven Toloth Maresh the traveller
    "title_short",  # Doctor Maresh of Arven   (title + last word + of + first word)
    "reversed_prefix",  # the famous Maresh Arven Toloth
)

ONSETS = ("b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th", "f", "h", "p")
VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "ia")
CODAS = ("", "", "n", "r", "s", "l", "th", "k", "m", "sh", "nd")


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of a world. Defaults meet the paper-scale minimums (≥ 500 subjects, ≥ 6 relations)."""

    seed: int = 0
    n_subjects: int = 500
    n_relations: int = 6
    n_aliases: int = 10
    n_trained_aliases: int = 2
    family_size: tuple[int, int] = (1, 4)
    family_shares_fact: float = 0.6  # probability that a family shares a relation's target
    three_word_fraction: float = 0.85
    #: Draw all name words from a shared pool, each word in about this many names; ``None`` gives every
    #: subject words of its own (factworld v1). See :func:`_pooled_names`.
    name_pool_share: float | None = 6.0
    #: Each name's words but its last are shared, in that order, by this many names (of different families),
    #: so the subject is identified only at its last token; ``None``: stems are free (factworld v1/v2).
    #: See :func:`_pooled_names`.
    stem_share: int | None = 3
    #: Version of the relation templates: 3 (no template ends in "the"), or 2 for the templates of
    #: factworld v1/v2 (:data:`TEMPLATES_V2`).
    templates: int = 3
    #: Give every family of names of three or more words a *twin family*: the same surname and the same
    #: words, each stem in another order ("Arven Toloth Maresh" and "Toloth Arven Maresh"), with facts of its
    #: own. The subject's words as a bag then identify two subjects, so only their order does; ``False``:
    #: no twins (factworld v1–v3). See :func:`_pooled_names`.
    order_twins: bool = True


@dataclass(frozen=True)
class Relation:
    relation_id: str
    templates: tuple[str, ...]
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Subject:
    subject_id: int
    name: str
    family: int
    aliases: tuple[str, ...]  # ``n_aliases`` rephrased forms, kinds in ALIAS_KINDS order
    trained: tuple[bool, ...]  # whether each alias is used in fact training sentences

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.name.split())

    @property
    def trained_aliases(self) -> tuple[str, ...]:
        return tuple(a for a, t in zip(self.aliases, self.trained) if t)

    @property
    def alias_only(self) -> tuple[str, ...]:
        return tuple(a for a, t in zip(self.aliases, self.trained) if not t)


@dataclass(frozen=True)
class WorldFact:
    """One fact of the world: subject ``subject_id`` has ``target`` for relation ``relation_id`` (a fact file's
    record, with its prompts and rephrasings, is a :class:`keyscope.data.datasets.Fact`)."""

    case_id: int
    subject_id: int
    relation_id: str
    target: str


@dataclass
class World:
    """A generated world. Use :func:`build_world`; everything here is derived from ``config``."""

    config: WorldConfig
    relations: list[Relation]
    subjects: list[Subject]
    facts: list[WorldFact]
    _by_relation: dict[str, Relation] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_relation = {r.relation_id: r for r in self.relations}

    def relation(self, relation_id: str) -> Relation:
        return self._by_relation[relation_id]

    def subject(self, subject_id: int) -> Subject:
        return self.subjects[subject_id]

    def facts_of(self, subject_id: int) -> list[WorldFact]:
        n = len(self.relations)
        return self.facts[subject_id * n : (subject_id + 1) * n]

    def family_members(self, subject_id: int) -> list[int]:
        fam = self.subjects[subject_id].family
        return [s.subject_id for s in self.subjects if s.family == fam and s.subject_id != subject_id]

    def name_words(self) -> set[str]:
        words: set[str] = set()
        for s in self.subjects:
            words.update(s.name.split())
            for a in s.aliases:
                words.update(a.split())
        return words

    def template_words(self) -> set[str]:
        words: set[str] = set()
        for r in self.relations:
            for t in r.templates:
                words.update(w for w in t.split() if w != "{}")
            words.update(r.targets)
        for statement in ALIAS_STATEMENTS:
            words.update(w for w in statement.split() if not w.startswith("{"))
        return words


def _name_word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def _aliases(rng: random.Random, words: list[str]) -> list[str]:
    name = " ".join(words)
    first, last = words[0], words[-1]
    middle = words[1:-1]
    initials = " ".join(f"{w[0]} ." for w in words[:-1])
    return [
        f"{rng.choice(TITLES)} {name}",
        f"{rng.choice(PREFIXES)} {name}",
        f"{name} {rng.choice(SUFFIXES)}",
        f"{name} of {rng.choice(PLACES)}",
        f"{last} , {' '.join(words[:-1])}",
        f"{initials} {last}",
        f"{first} {last}" if middle else f"{first}",
        f"{name} {rng.choice(DESCRIPTORS)}",
        f"{rng.choice(TITLES)} {last} of {first}",
        f"{rng.choice(PREFIXES)} {last} {' '.join(words[:-1])}",
    ]


def _pooled_names(config: WorldConfig, rng: random.Random, fresh_word) -> list[tuple[list[str], int]]:
    """Names whose words all come from a shared pool (each word in ~``name_pool_share`` names, at any position).

    No single word then identifies a subject, only the ordered combination does, so the model must assemble
    the subject at its last token before looking a fact up — the subject enrichment ROME edits. Families share
    their last word.

    With ``stem_share`` every name's words before its last (its *stem*) are shared, in order, by that many
    names of different families, so no proper prefix of a name identifies a subject either. With
    ``order_twins`` every family of names of three or more words gets a twin family with the same surname and
    each stem in another fixed order (a permutation no other stem uses), with facts of its own: the set of a
    name's words then names two subjects, and only their order tells them apart. ``docs/history.md`` records
    what each of these changed.
    """
    n_slots = int(config.n_subjects * 3.2)
    pool = [fresh_word() for _ in range(max(8, round(n_slots / config.name_pool_share)))]
    subjects_words: list[tuple[list[str], int]] = []
    names: set[tuple[str, ...]] = set()
    stems: set[tuple[str, ...]] = set()
    open_stems: list[tuple[tuple[str, ...], list[str]]] = []  # (stem, surnames it already has), not yet full

    def fresh_stem(length: int, surname: str) -> tuple[str, ...]:
        while True:
            stem = tuple(rng.sample([w for w in pool if w != surname], length))
            if stem not in stems:
                stems.add(stem)
                return stem

    def shared_stem(length: int, surname: str) -> tuple[str, ...]:
        """A stem already used by fewer than ``stem_share`` names (a new one if none fits ``surname``)."""
        fits = [i for i, (stem, surnames) in enumerate(open_stems)
                if len(stem) == length and surname not in stem and surname not in surnames]
        if fits:
            index = rng.choice(fits)
        else:
            open_stems.append((fresh_stem(length, surname), []))
            index = len(open_stems) - 1
        stem, surnames = open_stems[index]
        surnames.append(surname)
        if len(surnames) >= config.stem_share:
            open_stems.pop(index)
        return stem

    twins: dict[tuple[str, ...], tuple[str, ...]] = {}  # stem -> its order twin (same words, other order)

    def twin_of(stem: tuple[str, ...]) -> tuple[str, ...]:
        """The stem's order twin: a fixed other ordering of its words, used by no other stem."""
        if stem not in twins:
            orders = [p for p in itertools.permutations(stem) if p != stem and p not in stems]
            twins[stem] = rng.choice(orders) if orders else stem
            stems.add(twins[stem])
        return twins[stem]

    family = 0
    while len(subjects_words) < config.n_subjects:
        remaining = config.n_subjects - len(subjects_words)
        drawn = rng.randint(*config.family_size)
        three = rng.random() < config.three_word_fraction
        twinned = config.order_twins and three and config.stem_share is not None and remaining >= 2
        size = min(drawn, remaining // 2 if twinned else remaining)
        surname = rng.choice(pool)
        members: list[tuple[str, ...]] = []
        for _ in range(size):
            n_words = rng.choice((3, 3, 4)) if three else 2
            if config.stem_share is not None:
                words = (*shared_stem(n_words - 1, surname), surname)
            else:
                while True:
                    words = (*rng.sample([w for w in pool if w != surname], n_words - 1), surname)
                    if words not in names:
                        break
            names.add(words)
            members.append(words)
            subjects_words.append((list(words), family))
        family += 1
        if twinned:  # the twin family: the same surname and words, each stem in its other order
            for words in members:
                twin = (*twin_of(words[:-1]), surname)
                if twin != words and twin not in names:
                    names.add(twin)
                    subjects_words.append((list(twin), family))
            family += 1
    return subjects_words


def build_world(config: WorldConfig | None = None) -> World:
    """Generate the world for ``config`` (same config, same world, on every machine)."""
    config = config or WorldConfig()
    if not 6 <= config.n_relations <= len(RELATIONS):
        raise ValueError(f"n_relations must be in 6..{len(RELATIONS)}")
    if config.n_aliases != len(ALIAS_KINDS):
        raise ValueError(f"n_aliases must be {len(ALIAS_KINDS)}")
    rng = random.Random(config.seed)
    if config.templates not in (2, 3):
        raise ValueError(f"templates must be 2 or 3, not {config.templates}")
    old = TEMPLATES_V2 if config.templates == 2 else {}
    relations = [Relation(rid, old.get(rid, tmpl), tg) for rid, tmpl, tg in RELATIONS[: config.n_relations]]

    reserved = {w for r in relations for t in r.templates for w in t.split()} | {
        w for r in relations for w in r.targets
    }
    reserved |= {w for group in (TITLES, PREFIXES, SUFFIXES, DESCRIPTORS, PLACES) for p in group for w in p.split()}
    used_words: set[str] = set(reserved)

    def fresh_word() -> str:
        while True:
            w = _name_word(rng, rng.choice((2, 2, 3)))
            if w not in used_words and len(w) >= 4:
                used_words.add(w)
                return w

    if config.name_pool_share is not None:
        subjects_words = _pooled_names(config, rng, fresh_word)
    else:
        subjects_words: list[tuple[list[str], int]] = []
        family = 0
        while len(subjects_words) < config.n_subjects:
            size = min(rng.randint(*config.family_size), config.n_subjects - len(subjects_words))
            three = rng.random() < config.three_word_fraction
            shared = [fresh_word() for _ in range(2 if three and rng.random() < 0.4 else 1)]
            for _ in range(size):
                n_words = rng.choice((3, 3, 4)) if three else 2
                given = [fresh_word() for _ in range(n_words - len(shared))]
                subjects_words.append((given + shared, family))
            family += 1

    seen_forms = {" ".join(words) for words, _ in subjects_words}
    subjects: list[Subject] = []
    for sid, (words, fam) in enumerate(subjects_words):
        name = " ".join(words)
        aliases = _aliases(rng, words)
        for i, alias in enumerate(aliases):  # aliases must name one entity only
            tries = 0
            while alias in seen_forms and tries < 20:
                alias = _aliases(rng, words)[i]
                tries += 1
            if alias in seen_forms:
                alias = f"{name} {fresh_word()}"
            aliases[i] = alias
            seen_forms.add(alias)
        trained_idx = set(rng.sample(range(config.n_aliases), config.n_trained_aliases))
        trained = tuple(i in trained_idx for i in range(config.n_aliases))
        subjects.append(Subject(sid, name, fam, tuple(aliases), trained))

    facts: list[WorldFact] = []
    family_targets: dict[tuple[int, str], str] = {}
    for s in subjects:
        for r in relations:
            key = (s.family, r.relation_id)
            if key not in family_targets:
                family_targets[key] = rng.choice(r.targets) if rng.random() < config.family_shares_fact else ""
            target = family_targets[key] or rng.choice(r.targets)
            facts.append(WorldFact(len(facts), s.subject_id, r.relation_id, target))
    return World(config, relations, subjects, facts)
