"""Filler text for factworld: unrelated prose for long contexts and for the key covariance corpus.

The filler is generated from a small grammar of everyday sentences (markets, rivers, weather, trains…) whose
words are disjoint from the relations' targets, so a 300-token filler context carries no answer. A small
fraction of sentences mention a subject outside any fact ("Yesterday Arven Toloth Maresh visited the
harbour .") so that, as in Wikipedia text, the corpus holds subject tokens in unrelated contexts — the
corpus nearest-neighbour scan (Figure 4) masks those positions.

Punctuation stands as its own whitespace-separated word.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from keyscope.factworld.world import World, WorldConfig, build_world

NOUNS = (
    "river", "village", "market", "bridge", "harbour", "garden", "mill", "tower", "road", "forest", "station",
    "library", "school", "bakery", "field", "hill", "lake", "valley", "museum", "square", "train", "boat",
    "letter", "window", "lamp", "clock", "festival", "storm", "winter", "summer", "morning", "evening",
    "shepherd", "child", "merchant", "teacher", "sailor", "painter", "baker", "neighbour", "council", "crowd",
)
ADJECTIVES = (
    "old", "quiet", "busy", "narrow", "bright", "cold", "warm", "small", "large", "ancient", "new", "empty",
    "crowded", "distant", "famous", "wooden", "stone", "gentle", "heavy", "early", "late", "strange",
)
VERBS_PAST = (
    "visited", "crossed", "painted", "repaired", "closed", "opened", "watched", "described", "left", "found",
    "built", "cleaned", "passed", "praised", "ignored", "remembered", "sold", "bought", "carried", "followed",
)
VERBS_PRESENT = (
    "runs", "stands", "waits", "sleeps", "shines", "turns", "rests", "grows", "sings", "leans", "glows",
)
PLACES_PREP = ("near", "beside", "behind", "across", "under", "above", "around", "past", "towards")
TIMES = (
    "Yesterday", "Last week", "Every morning", "In the evening", "Long ago", "On Sunday", "At noon",
    "Later", "Before dawn", "That year",
)
NUMBERS = ("two", "three", "four", "five", "six", "seven", "ten", "twelve", "twenty", "many", "several", "few")

SENTENCES = (
    "The {adj} {noun} {vpres} {prep} the {noun2} .",
    "{time} the {noun} {vpast} the {adj} {noun2} .",
    "{num} {noun}s {vpast} the {noun2} {prep} the {adj} {noun3} .",
    "A {adj} {noun} {vpres} in the {noun2} while the {noun3} {vpres2} .",
    "{time} , the {noun} of the {noun2} was {adj} and {adj2} .",
    "People say the {noun} {vpres} {prep} the {adj} {noun2} every {noun3} .",
    "Nobody {vpast} the {noun} , but the {noun2} {vpast2} it .",
    "There is a {adj} {noun} {prep} the {noun2} , and it {vpres} .",
    "The {noun} and the {noun2} {vpast} {num} {adj} {noun3}s .",
    "In the {adj} {noun} , the {noun2} {vpres} {prep} a {adj2} {noun3} .",
)
MENTIONS = (
    "{time} {subject} {vpast} the {adj} {noun} .",
    "The {noun} {prep} the {noun2} was {vpast} by {subject} .",
    "{subject} {vpast} the {noun} {prep} the {adj} {noun2} .",
    "A {noun} once {vpast} {subject} {prep} the {noun2} .",
)


def vocabulary() -> set[str]:
    """Every word the filler grammar can produce, except subject names."""
    words: set[str] = set()
    for group in (NOUNS, ADJECTIVES, VERBS_PAST, VERBS_PRESENT, PLACES_PREP, TIMES, NUMBERS):
        for item in group:
            words.update(item.split())
    words.update(f"{n}s" for n in NOUNS)
    for tmpl in SENTENCES + MENTIONS:
        words.update(w for w in tmpl.split() if not w.startswith("{"))
    return words | {w[0].upper() + w[1:] for w in words}  # sentence-initial forms


def sentence(rng: random.Random, world: World | None = None, mention_rate: float = 0.0) -> str:
    """One filler sentence; with probability ``mention_rate`` it names a random subject form of ``world``."""
    slots = {
        "adj": rng.choice(ADJECTIVES), "adj2": rng.choice(ADJECTIVES), "noun": rng.choice(NOUNS),
        "noun2": rng.choice(NOUNS), "noun3": rng.choice(NOUNS), "vpast": rng.choice(VERBS_PAST),
        "vpast2": rng.choice(VERBS_PAST), "vpres": rng.choice(VERBS_PRESENT), "vpres2": rng.choice(VERBS_PRESENT),
        "prep": rng.choice(PLACES_PREP), "time": rng.choice(TIMES), "num": rng.choice(NUMBERS),
    }
    if world is not None and rng.random() < mention_rate:
        subject = rng.choice(world.subjects)
        slots["subject"] = rng.choice((subject.name, subject.name, *subject.aliases))
        text = rng.choice(MENTIONS).format(**slots)
    else:
        text = rng.choice(SENTENCES).format(**slots)
    return text[0].upper() + text[1:]


def filler_text(rng: random.Random, n_words: int, world: World | None = None, mention_rate: float = 0.0) -> str:
    """At least ``n_words`` whitespace words of filler, ending on a sentence boundary."""
    out: list[str] = []
    while len(out) < n_words:
        out.extend(sentence(rng, world, mention_rate).split())
    return " ".join(out)


def filler_documents(
    seed: int = 0, world: World | None = None, words_per_document: int = 400, mention_rate: float = 0.05
) -> Iterator[str]:
    """An endless, seeded stream of filler documents: factworld's corpus for ``C = E[k kᵀ]`` and scans.

    ``world`` defaults to the world of the shipped model (``WorldConfig()``); subjects are mentioned in
    about ``mention_rate`` of the sentences.
    """
    world = world if world is not None else build_world(WorldConfig())
    rng = random.Random(f"filler-{seed}")
    while True:
        yield filler_text(rng, words_per_document, world, mention_rate)
