"""The perturbed prompts of a fact: token and word shuffles, long contexts, rephrasings, and the
leave-kind-out split into in-domain and out-of-domain probes."""

from __future__ import annotations

from collections import Counter

import pytest

from keyscope.data import perturbations as pt
from keyscope.data.datasets import Fact
from keyscope.data.prompts import fill, locate, subject_last_index
from tests import hf_tiny


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "bpe": hf_tiny.byte_level_bpe_tokenizer(),
        "sp": hf_tiny.sentencepiece_style_tokenizer(),
        "word": hf_tiny.word_level_tokenizer(),
    }


SHUFFLE_CASES = [
    ("{} is located in Paris", "The Eiffel Tower"),
    ("{} played basketball for the", "Michael Jordan"),
    ("The city of {} is big", "São Paulo"),
    ("Kobe Bryant played for the {}", "Los Angeles Lakers"),
]


@pytest.mark.parametrize("tok_name", ["bpe", "sp", "word"])
@pytest.mark.parametrize("template,subject", SHUFFLE_CASES)
def test_shuffles_decode_to_text_with_the_same_token_multiset(tokenizers, tok_name, template, subject):
    tok = tokenizers[tok_name]
    original = pt.subject_tokens(tok, template, subject)
    probes = pt.shuffled_subjects(tok, template, subject, n=10, seed=0)
    assert len(probes) <= 10
    assert len({p.prompt for p in probes}) == len(probes), "distinct permutations"
    for p in probes:
        assert p.kind == "shuffle" and p.exact_tokens is True
        assert "Ġ" not in p.prompt and "▁" not in p.prompt, "decoded text, not raw pieces"
        assert p.template.count("{}") == 1
        assert p.prompt != fill(template, subject).text
        assert pt.same_token_multiset(tok, p, template, subject)
        assert pt.subject_tokens(tok, p.template, p.subject) != original
        shuffled = pt.subject_tokens(tok, p.template, p.subject)
        assert Counter(shuffled) <= Counter(original)  # a bare-space token at the edge may fall outside
        # the subject's last token is the last shuffled token, at the same position as before
        assert subject_last_index(tok, p.template, p.subject) == subject_last_index(tok, template, subject)
    if len(set(original)) >= 3 and tok_name != "bpe":
        assert len(probes) >= 2


def test_shuffles_exist_for_the_tiny_tokenizers(tokenizers):
    counts = {name: len(pt.shuffled_subjects(tok, "{} played basketball for the", "Michael Jordan"))
              for name, tok in tokenizers.items()}
    assert counts["word"] == 1  # two words: one other order
    assert counts["bpe"] >= 3 and counts["sp"] >= 3


def test_byte_split_characters_cannot_always_be_shuffled(tokenizers):
    """Byte-level BPE splits ``ã`` into two byte tokens; most permutations separate them into invalid UTF-8,
    so the decoded text no longer re-tokenises into the shuffled tokens — those are flagged, and dropped
    by default."""
    tok = tokenizers["bpe"]
    every = pt.shuffled_subjects(tok, "The city of {} is big", "São Paulo", n=10, require_exact=False)
    assert any(p.exact_tokens is False for p in every)
    exact = pt.shuffled_subjects(tok, "The city of {} is big", "São Paulo", n=10)
    assert exact and all(p.exact_tokens for p in exact)
    assert not all(pt.same_token_multiset(tok, p, "The city of {} is big", "São Paulo") for p in every)


def test_single_token_subject_has_no_shuffle(tokenizers):
    assert pt.shuffled_subjects(tokenizers["word"], "{} is a country", "Slovenia") == []


@pytest.mark.parametrize("tok_name", ["bpe", "sp", "word"])
def test_long_context_has_exact_token_count(tokenizers, tok_name):
    tok = tokenizers[tok_name]
    context = iter(hf_tiny.TRAINING_TEXT * 3)
    probe = pt.long_context(tok, "{} is located in", "The Eiffel Tower", context, n_tokens=300)
    assert probe.kind == "long" and probe.n_context_tokens == 300
    head = probe.template[: probe.template.index("{}")]
    assert pt.count_prefix_tokens(tok, probe.prompt, len(head)) == 300
    assert probe.prompt.endswith("The Eiffel Tower is located in")
    # the prompt keeps its own tokens after the context, so the subject index moves by exactly 300
    short_enc, short_index = locate(tok, "{} is located in", "The Eiffel Tower", prepend_bos=False)
    long_index = subject_last_index(tok, probe.template, probe.subject, prepend_bos=False)
    assert long_index == short_index + 300
    # a second fact drawing from the same iterator gets different text
    other = pt.long_context(tok, "{} is located in", "The Eiffel Tower", context, n_tokens=300)
    assert other.template != probe.template


def test_rephrased_and_other_subjects():
    probes = pt.rephrased_subjects("{} is in Paris", "The Eiffel Tower", ["Eiffel Tower", "La tour Eiffel", ""])
    assert [p.prompt for p in probes] == ["Eiffel Tower is in Paris", "La tour Eiffel is in Paris"]
    assert all(p.kind == "rephrase" for p in probes)
    pool = ["Big Ben", "Colosseum", "The Eiffel Tower", "Big Ben", "Louvre"]
    others = pt.other_subjects("The Eiffel Tower is in Paris", "The Eiffel Tower", pool, n=2, seed=1)
    assert len(others) == 2 and len({p.subject for p in others}) == 2
    assert all(p.subject != "The Eiffel Tower" and p.template == "{} is in Paris" for p in others)
    assert pt.other_subjects("{} x", "A", pool, n=10) == pt.other_subjects("{} x", "A", pool, n=10)


def test_word_shuffles_permute_whole_words_and_skip_other_subjects():
    probes = pt.word_shuffled_subjects("{} works for", "Ann Bea Cid", n=10, seed=0, exclude={"Bea Ann Cid"})
    forms = [p.subject for p in probes]
    assert sorted(forms) == sorted(["Ann Cid Bea", "Bea Cid Ann", "Cid Ann Bea", "Cid Bea Ann"])  # 5 others, 1 excluded
    assert all(p.kind == "shuffle_words" and p.source == "canonical" and p.template == "{} works for" for p in probes)
    assert pt.word_shuffled_subjects("{} x", "Single", n=5) == []
    assert pt.word_shuffled_subjects("{} x", "Ann Bea Cid", n=2, seed=3) == pt.word_shuffled_subjects("{} x", "Ann Bea Cid", n=2, seed=3)


def test_token_shuffles_skip_forms_that_name_other_subjects(tokenizers):
    tok = tokenizers["word"]
    every = pt.shuffled_subjects(tok, "{} played basketball for the", "Michael Jordan", n=10)
    assert [p.subject for p in every] == ["Jordan Michael"]
    assert pt.shuffled_subjects(tok, "{} played basketball for the", "Michael Jordan", n=10,
                                exclude={"Jordan Michael"}) == []


def _fact(kinds=True):
    rephrase = ["Lord Ann Bea Cid", "Cid , Ann Bea", "A . B . Cid", "Ann Bea Cid the Elder"]
    extras = {"subject_rephrase_kind": ["title", "word_order", "initials", "suffix"]} if kinds else {}
    return Fact(case_id=7, prompt="{} works as a", subject="Ann Bea Cid", target_new="poet", target_true="doctor",
                paraphrase_prompts=("The profession of Ann Bea Cid is",), subject_rephrase=tuple(rephrase), extras=extras)


def test_leave_kind_out_split_by_rephrase_kind_and_source(tokenizers):
    tok = tokenizers["bpe"]
    config = pt.PerturbationConfig(n_shuffles=3, n_word_shuffles=3, n_long_contexts=2, long_context_tokens=20)
    facts = [_fact(), Fact(case_id=8, prompt="{} works as a", subject="Dee Eve", target_new="a", target_true="b")]
    probes = pt.fact_probes(tok, facts[0], iter(hf_tiny.TRAINING_TEXT * 20), config,
                            exclude=pt.subject_forms(facts), other_facts=facts)
    rephrase_id, rephrase_ood = probes.perturbed["rephrase"]
    assert {p.source for p in rephrase_id} == {"title", "suffix"}
    assert {p.source for p in rephrase_ood} == {"word_order", "initials"}
    shuffle_id, shuffle_ood = probes.perturbed["shuffle"]
    assert shuffle_id and all(p.source == "canonical" for p in shuffle_id)
    assert shuffle_ood and {p.source for p in shuffle_ood} <= {"word_order", "initials"}
    assert all(Counter(p.subject.replace(" ", "")) == Counter("AnnBeaCid") for p in shuffle_id)  # same pieces
    long_id, long_ood = probes.perturbed["long"]
    assert [p.source for p in long_id] == ["corpus", "corpus"] and [p.source for p in long_ood] == ["facts", "facts"]
    assert all("works as a" in p.template and p.n_context_tokens == 20 for p in long_id + long_ood)
    assert "Dee Eve works as a b ." in long_ood[0].template  # other facts' sentences before the prompt
    training = probes.training_probes()
    for kind in pt.KINDS:
        assert not set(probes.perturbed[kind][1]) & set(training)  # nothing out-of-domain is trained on
    assert [p.kind for p in probes.templates] == ["template"] and probes.templates[0].subject == "Ann Bea Cid"


def test_without_kinds_the_second_half_of_the_rephrasings_is_out_of_domain(tokenizers):
    probes = pt.fact_probes(tokenizers["bpe"], _fact(kinds=False), None, pt.PerturbationConfig())
    rephrase_id, rephrase_ood = probes.perturbed["rephrase"]
    assert [p.source for p in rephrase_id] == ["#0", "#1"] and [p.source for p in rephrase_ood] == ["#2", "#3"]
    assert probes.perturbed["long"] == ((), ())


def test_paper_protocol_gives_five_in_domain_and_five_out_of_domain_queries_of_each_kind(tokenizers):
    """Yan et al.'s Table 1: a fact with 10 rephrased subjects gets 5 + 5 of every kind (corpus text for the
    in-domain long contexts, other facts' sentences out of domain)."""
    fact = Fact(case_id=3, prompt="{} works as a", subject="Ann Bea Cid", target_new="poet", target_true="doctor",
                subject_rephrase=tuple(f"Ann Bea Cid {i}" for i in range(10)))
    others = [Fact(case_id=i, prompt="{} lives in", subject=f"Dan Eve {i}", target_new="Rome", target_true="Oslo")
              for i in range(4)]
    docs = iter(["The river runs through the old town and past the mill. " * 40] * 20)
    probes = pt.fact_probes(tokenizers["bpe"], fact, docs, pt.PROTOCOLS["paper"], other_facts=others)
    counts = {kind: tuple(len(half) for half in halves) for kind, halves in probes.perturbed.items()}
    assert counts == {"rephrase": (5, 5), "shuffle": (5, 5), "shuffle_words": (5, 5), "long": (5, 5)}
    assert pt.PROTOCOLS["keyscope"] == pt.PerturbationConfig()


# ------------------------------------------------------------------------------------------ each caller's probes


def _long_fact():
    rephrase = [f"Ann Bea Cid {i}" for i in range(11)] + ["Cid , Ann Bea", " "]
    return Fact(case_id=9, prompt="{} works as a", subject="Ann Bea Cid", target_new="poet", target_true="doctor",
                subject_rephrase=tuple(rephrase))


@pytest.mark.parametrize("kinds", [True, False])
@pytest.mark.parametrize("n_shuffles,context_tokens,max_positions", [(3, 20, None), (0, 20, None), (2, 300, 40)])
def test_edit_probes_are_the_edit_prompt_its_rephrasings_shuffles_and_one_long_context(
        tokenizers, kinds, n_shuffles, context_tokens, max_positions):
    """``keyscope edit``'s parametrisation of the one builder gives the probes its own builder made before
    (reference: that builder's steps, written out with the primitives)."""
    from keyscope.analysis.predictions import prompt_context
    from keyscope.editing.request import EditRequest
    from keyscope.studies import edit as ed

    tok = tokenizers["bpe"]
    fact = _fact(kinds)
    request = EditRequest(fact.prompt, fact.subject, fact.target_new, fact.target_true)
    exclude = frozenset({"Cid Ann Bea", "Bea Ann Cid"})
    kind_names = pt.rephrase_kinds(fact)
    config = ed.ProbeConfig(ed.edit_probes(n_shuffles, context_tokens, seed=1))
    got = ed.build_probes(tok, request, fact.subject_rephrase, iter(hf_tiny.TRAINING_TEXT * 20), config,
                          max_positions=max_positions, rephrase_kinds=kind_names, exclude=exclude)

    template, subject = request.template, request.subject
    expected = [pt.Probe(template, subject, pt.ORIGINAL),
                *pt.rephrased_subjects(template, subject, fact.subject_rephrase, kind_names)]
    if n_shuffles:
        expected += pt.shuffled_subjects(tok, template, subject, n=n_shuffles, seed=1, exclude=exclude)
        expected += pt.word_shuffled_subjects(template, subject, n=n_shuffles, seed=1, exclude=exclude)
    n_context = context_tokens
    if max_positions is not None:
        n_context = min(n_context, max_positions - len(prompt_context(tok, fill(template, subject).text)) - 8)
    expected.append(pt.long_context(tok, template, subject, iter(hf_tiny.TRAINING_TEXT * 20), n_tokens=n_context))
    assert got == expected
    assert [p.kind for p in got][:5] == ["original", *["rephrase"] * 4]  # the dataset's order, none held out
    assert got[-1].n_context_tokens == n_context and (n_shuffles == 0) == (len(got) == 6)


def test_figure_5_rephrases_are_every_rephrased_subject_in_the_fact_prompt(tokenizers):
    """Figure 5's parametrisation (:data:`keyscope.data.perturbations.REPHRASES`): every non-blank rephrasing,
    more than the default cap of 10, in the dataset's order, and nothing else."""
    from keyscope.analysis.predictions import target_sequence
    from keyscope.studies import values as va

    tok, fact = tokenizers["bpe"], _long_fact()
    probes = pt.fact_probes(tok, fact, iter(hf_tiny.TRAINING_TEXT * 20), pt.REPHRASES)
    expected = [fill(fact.prompt, alias).text for alias in fact.subject_rephrase if alias.strip()]
    assert [p.prompt for p in probes.perturbed[pt.REPHRASE][0]] == expected and len(expected) == 12
    assert [p for p in probes.all() if p.kind != pt.ORIGINAL] == list(probes.perturbed[pt.REPHRASE][0])
    plan = va._plan(tok, fact)
    assert [plan.sequences[new] for new, _ in plan.groups["rephrase"]] == [
        target_sequence(tok, p, fact.target_new) for p in expected]


def test_no_shuffles_asked_gives_none(tokenizers):
    assert pt.shuffled_subjects(tokenizers["bpe"], "{} works as a", "Michael Jordan", n=0) == []
    assert pt.word_shuffled_subjects("{} works as a", "Ann Bea Cid", n=0) == []
    config = pt.PerturbationConfig(n_shuffles=0, n_word_shuffles=0)
    probes = pt.fact_probes(tokenizers["bpe"], _fact(), None, config)
    assert probes.perturbed[pt.SHUFFLE] == ((), ()) and probes.perturbed[pt.SHUFFLE_WORDS] == ((), ())


def test_facts_sharing_a_context_source_get_text_of_their_own_and_a_tiny_corpus_says_so(tokenizers, recwarn):
    from keyscope.data.corpus import ContextSource

    tok = tokenizers["bpe"]
    config = pt.PerturbationConfig(n_rephrase=0, n_shuffles=0, n_word_shuffles=0, n_long_contexts=2,
                                   long_context_tokens=20, n_random=0)
    facts = [Fact(case_id=i, prompt="{} works as a", subject="Ann Bea Cid", target_new="poet", target_true="doctor")
             for i in range(30)]
    contexts = ContextSource(hf_tiny.TRAINING_TEXT[:10])  # room for a few contexts, not for 60
    longs = [p for fact in facts for p in pt.fact_probes(tok, fact, contexts, config).perturbed["long"][0]]
    assert len(longs) == 60 and all(abs(p.n_context_tokens - 20) <= 1 and p.source == "corpus" for p in longs)
    own = contexts.n_taken - contexts.n_reused
    assert contexts.n_taken == 60 and 3 <= own < 60
    assert len({p.template for p in longs[:own]}) == own, "distinct text until the corpus runs out"
    warned = [str(w.message) for w in recwarn.list]
    assert len(warned) == 1 and f"ran out after {own} long contexts with text of their own" in warned[0]
    # documents passed to one fact alone serve its contexts in turn: two contexts, two texts
    alone = pt.fact_probes(tok, facts[0], hf_tiny.TRAINING_TEXT[:10], config).perturbed["long"][0]
    assert alone[0].template == longs[0].template and alone[1].template == longs[1].template
