from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from keyscope.factworld import WorldConfig, build_world, corpus, export
from keyscope.factworld.tokenizer import TokenizerConfig, build_tokenizer
from keyscope.factworld.world import ALIAS_KINDS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig())


def test_world_meets_the_size_minimums(world):
    assert len(world.subjects) >= 500
    assert len(world.relations) >= 6
    assert all(len(r.templates) >= 3 and len(r.targets) >= 5 for r in world.relations)
    assert len(world.facts) == len(world.subjects) * len(world.relations)
    lengths = Counter(len(s.words) for s in world.subjects)
    assert sum(n for k, n in lengths.items() if k >= 3) / len(world.subjects) > 0.5  # most names >= 3 tokens


def test_every_subject_has_ten_unique_rephrases(world):
    forms = Counter()
    for s in world.subjects:
        assert len(s.aliases) == 10 == len(ALIAS_KINDS)
        assert 0 < sum(s.trained) < 10  # some trained aliases and some alias-only forms
        forms.update((s.name, *s.aliases))
    assert max(forms.values()) == 1  # every surface form names exactly one subject


def test_families_share_tokens_and_facts(world):
    multi = [s for s in world.subjects if world.family_members(s.subject_id)]
    assert len(multi) > 100
    s = multi[0]
    other = world.subject(world.family_members(s.subject_id)[0])
    assert s.words[-1] == other.words[-1]  # different subjects, same last token
    shared = sum(
        a.target == b.target for a, b in zip(world.facts_of(s.subject_id), world.facts_of(other.subject_id))
    )
    assert shared >= 1 or any(  # at least some family shares facts
        sum(a.target == b.target for a, b in zip(world.facts_of(x.subject_id), world.facts_of(y)))
        for x in multi[:50] for y in world.family_members(x.subject_id)
    )


def test_world_is_deterministic_and_seed_dependent():
    a, b, c = build_world(WorldConfig(seed=3)), build_world(WorldConfig(seed=3)), build_world(WorldConfig(seed=4))
    assert [s.aliases for s in a.subjects] == [s.aliases for s in b.subjects]
    assert [f.target for f in a.facts] == [f.target for f in b.facts]
    assert [s.name for s in a.subjects] != [s.name for s in c.subjects]


def test_word_level_tokenizer_covers_the_world_and_filler(world):
    tok = build_tokenizer(world, TokenizerConfig(kind="word"))
    unk = tok.unk_token_id
    for s in world.subjects[:100]:
        for form in (s.name, *s.aliases):
            ids = tok(form)["input_ids"]
            assert unk not in ids and ids[0] == tok.bos_token_id and len(ids) == 1 + len(form.split())
    text = corpus.filler_text(__import__("random").Random(0), 2000, world, mention_rate=0.2)
    assert unk not in tok(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text  # exact round trip


def test_bpe_tokenizer_cuts_names_into_subword_pieces(world):
    tok = build_tokenizer(world)
    assert len(tok) == TokenizerConfig().vocab_size and tok.unk_token_id not in tok(world.subjects[0].name)["input_ids"]
    counts = sorted(len(tok(s.name, add_special_tokens=False)["input_ids"]) for s in world.subjects)
    assert counts[len(counts) // 2] >= 4  # the median name is at least 4 tokens
    words = {w for s in world.subjects for w in s.words}
    split = sum(len(tok(w, add_special_tokens=False)["input_ids"]) >= 2 for w in words) / len(words)
    assert split > 0.5, split  # most name words are cut into pieces
    for relation in world.relations:  # targets stay single tokens after a prompt
        assert all(len(tok(" " + t, add_special_tokens=False)["input_ids"]) == 1 for t in relation.targets)
    text = corpus.filler_text(__import__("random").Random(0), 500, world, mention_rate=0.2)
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True).strip() == text
    enc = tok("The sport of " + world.subjects[3].name + " is", return_offsets_mapping=True)
    pieces = [text for text, (a, b) in zip(tok.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"]) if b > a]
    assert len(pieces) == len(enc["input_ids"]) - 1  # offsets for every token but the BOS
    again = build_tokenizer(world)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # training is deterministic


def test_order_twins_share_words_and_surname_but_not_facts(world):
    by_bag = {}
    for s in world.subjects:
        by_bag.setdefault((tuple(sorted(s.words)), s.words[-1]), []).append(s)
    twinned = [group for group in by_bag.values() if len(group) > 1]
    assert sum(len(g) for g in twinned) / len(world.subjects) > 0.8  # most subjects have an order twin
    a, b = twinned[0][:2]
    assert a.words != b.words and a.words[-1] == b.words[-1] and a.family != b.family
    records = export.records(world)
    assert b.name in records[a.subject_id * len(world.relations)]["order_twins"]
    old = build_world(WorldConfig(n_subjects=120, order_twins=False))
    old_bags = Counter((tuple(sorted(s.words)), s.words[-1]) for s in old.subjects)
    assert max(old_bags.values()) == 1


def test_filler_is_long_unrelated_and_seeded(world):
    docs = corpus.filler_documents(seed=1, world=world)
    first = [next(docs) for _ in range(3)]
    again = corpus.filler_documents(seed=1, world=world)
    assert first == [next(again) for _ in range(3)]
    assert all(len(d.split()) >= 300 for d in first)
    targets = {t for r in world.relations for t in r.targets}
    assert not targets & set(" ".join(first).split())


def test_export_schema(world, tmp_path):
    path = export.write(world, tmp_path / "facts.json")
    records = json.loads(path.read_text())
    assert len(records) == len(world.facts)
    r = records[0]
    for field in ("case_id", "prompt", "subject", "target_new", "target_true", "paraphrase_prompts",
                  "neighborhood_prompts", "subject_rephrase"):
        assert field in r
    assert "{}" in r["prompt"] and len(r["subject_rephrase"]) == 10
    assert r["target_new"] != r["target_true"]
    assert all(r["subject"] not in p for p in r["neighborhood_prompts"])


def test_shipped_export_matches_the_generator(world):
    shipped = REPO / "data" / "factworld" / "factworld.json"
    if not shipped.is_file():
        pytest.fail(f"{shipped} is missing: regenerate it with `keyscope factworld train --export`")
    assert json.loads(shipped.read_text()) == export.records(world)


def test_pooled_names_share_every_word():
    world = build_world(WorldConfig(n_subjects=200, name_pool_share=6.0))
    counts = Counter(w for s in world.subjects for w in s.words)
    assert sorted(counts.values())[len(counts) // 2] >= 3  # the median word is in >= 3 names
    assert len({s.words for s in world.subjects}) == len(world.subjects)  # ordered combinations are unique
    assert build_world(WorldConfig(n_subjects=200, name_pool_share=6.0)).subjects == world.subjects


def test_no_template_ends_in_the_and_old_cards_keep_theirs():
    from keyscope.factworld.card import world_config_of
    from keyscope.factworld.world import TEMPLATES_V2

    for relation in build_world(WorldConfig(n_subjects=50)).relations:
        assert all(t.split()[-1] != "the" for t in relation.templates), relation.templates
    old_card = {"train_config": {"world": {"seed": 0, "n_subjects": 50, "name_pool_share": 6.0}}}  # a v2 card
    assert world_config_of(old_card) == WorldConfig(n_subjects=50, templates=2, stem_share=None, order_twins=False)
    old = build_world(world_config_of(old_card))
    assert old.relation("instrument").templates == TEMPLATES_V2["instrument"]
    assert old.relation("sport").templates == build_world(WorldConfig(n_subjects=50)).relation("sport").templates
    with pytest.raises(ValueError, match="templates"):
        build_world(WorldConfig(templates=4))


def test_name_stems_are_shared_so_only_the_last_word_identifies_a_subject(world):
    stems = Counter(s.words[:-1] for s in world.subjects)
    shared = sum(n for n in stems.values() if n == world.config.stem_share) / len(world.subjects)
    assert shared >= 0.9, shared
    for subject in world.subjects:  # stem-mates differ in their last word, and are of different families
        mates = [m for m in world.subjects if m.words[:-1] == subject.words[:-1] and m is not subject]
        assert all(m.words[-1] != subject.words[-1] and m.family != subject.family for m in mates)
    free = build_world(WorldConfig(n_subjects=200, stem_share=None))
    free_stems = Counter(s.words[:-1] for s in free.subjects)
    assert sum(free_stems[s.words[:-1]] == 1 for s in free.subjects) / len(free.subjects) >= 0.9  # v2: stems identify
