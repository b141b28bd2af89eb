from __future__ import annotations

import pytest
import torch

from keyscope.analysis.predictions import (
    decode_token,
    known_facts,
    known_mask,
    next_token_top_k,
    predicts_target,
    prompt_context,
    target_context,
)
from keyscope.data.datasets import Fact
from keyscope.data.prompts import fill
from keyscope.model.models import load_model
from tests import hf_tiny

PROMPTS = ["The Eiffel Tower is located in", "Michael Jordan played basketball for the", "Kobe Bryant",
           "The Republic of Slovenia is a country in Central"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tiny_checkpoints):
    return load_model(str(tiny_checkpoints[request.param]))


def test_top_k_matches_one_prompt_at_a_time_for_any_batching(model):
    contexts = [prompt_context(model.tokenizer, p) for p in PROMPTS]
    targets = [c[-1] for c in contexts]
    for batch_size in (1, 3, 32):
        top = next_token_top_k(model, contexts, k=3, batch_size=batch_size, targets=targets)
        assert top.ids.shape == top.probabilities.shape == (len(PROMPTS), 3)
        for i, context in enumerate(contexts):
            with torch.no_grad():
                p = model(torch.tensor([context]), return_type="logits")[0, -1].float().softmax(-1)
            expected = p.topk(3)
            assert top.ids[i].tolist() == expected.indices.tolist()
            assert torch.allclose(top.probabilities[i], expected.values, atol=1e-5)
            assert float(top.target_probabilities[i]) == pytest.approx(float(p[targets[i]]), abs=1e-5)
        assert torch.equal(top.top1, top.ids[:, 0])


def test_contexts_keep_the_bos_and_stop_before_the_target(model):
    tokenizer = model.tokenizer
    context = prompt_context(tokenizer, "Kobe Bryant played for the")
    assert tokenizer.decode(context, skip_special_tokens=True).strip() == "Kobe Bryant played for the"
    before, first = target_context(tokenizer, "Kobe Bryant played for the", "Lakers")
    assert before == context and decode_token(tokenizer, first).strip() != ""
    with pytest.raises(ValueError):
        next_token_top_k(model, [context], targets=[1, 2])


def test_score_targets_is_teacher_forced_and_shares_rows(model):
    from keyscope.analysis.predictions import score_targets, target_sequence

    tokenizer = model.tokenizer
    pairs = [("The Eiffel Tower is located in", "Rome Italy"), ("The Eiffel Tower is located in", "Paris"),
             ("Kobe Bryant played for the", "Los Angeles Lakers"), ("Kobe Bryant played for the", "Paris")]
    sequences = [target_sequence(tokenizer, p, t) for p, t in pairs]
    assert sequences[0][1] >= 2  # a multi-token target
    for batch_size in (1, 4):
        scores = score_targets(model, sequences, batch_size=batch_size)
        for i, (ids, n_target) in enumerate(sequences):
            with torch.no_grad():
                logp = model(torch.tensor([ids]), return_type="logits")[0].float().log_softmax(-1)
            rows = range(len(ids) - n_target - 1, len(ids) - 1)
            wanted = ids[len(ids) - n_target :]
            expected = sum(float(logp[r, t]) for r, t in zip(rows, wanted))
            assert float(scores.log_probability[i]) == pytest.approx(expected, abs=1e-4)
            best = tuple(int(logp[r].argmax()) for r in rows)
            assert scores.argmax[i] == best and bool(scores.top1[i]) == (list(best) == list(wanted))
    with pytest.raises(ValueError):
        score_targets(model, [([1], 1)])


# ------------------------------------------------------------------------------------------ known facts


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    path = hf_tiny.save_tiny_checkpoint("gpt2", tmp_path_factory.mktemp("word") / "gpt2",
                                        tokenizer=hf_tiny.word_level_tokenizer())
    return load_model(str(path))


def _greedy_next_word(model, text: str) -> str:
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids, return_type="logits")
    return model.tokenizer.decode([int(logits[0, -1].argmax())])


def test_known_facts_keep_exactly_the_top1_true_targets(word_model):
    prompts = [("{} is located in", "The Eiffel Tower"), ("{} played basketball for the", "Michael Jordan"),
               ("The capital of {} is", "Slovenia"), ("{} plays the", "Toko Yasuda"), ("{} was created by", "Apple A5")]
    facts = []
    for i, (template, subject) in enumerate(prompts):
        predicted = _greedy_next_word(word_model, fill(template, subject).text)
        wrong = "France" if predicted != "France" else "Spain"
        truth = predicted if i % 2 == 0 else wrong  # even facts are known, odd ones are not
        facts.append(Fact(i, template, subject, target_new=wrong if i % 2 == 0 else predicted, target_true=truth))
    for batch_size in (1, 2, 32):  # batching and right padding do not change the answer
        known = known_facts(word_model, facts, batch_size=batch_size)
        assert [f.case_id for f in known] == [0, 2, 4]
    assert predicts_target(word_model, facts, "new").tolist() == [False, True, False, True, False]


def test_a_multi_token_target_is_judged_by_its_first_token_and_no_target_is_not_judged(word_model):
    template, subject = "{} is located in", "The Eiffel Tower"
    predicted = _greedy_next_word(word_model, fill(template, subject).text).strip()
    other = "France" if predicted != "France" else "Spain"
    facts = [Fact(0, template, subject, other, f"{predicted} {other}"),  # first token top-1: known
             Fact(1, template, subject, other, f"{other} {predicted}"),  # only a later token top-1: not known
             Fact(2, template, subject, other, None),  # no target_true: not judged
             Fact(3, template, subject, other, "  ")]
    assert known_mask(word_model, facts).tolist() == [True, False, False, False]
    assert [f.case_id for f in known_facts(word_model, facts, batch_size=1)] == [0]
    with pytest.raises(ValueError):  # predicts_target itself takes judged facts only
        predicts_target(word_model, facts[2:3])


def test_known_facts_on_a_bpe_model(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["gpt2"]))
    fact = Fact(0, "{} is located in", "The Eiffel Tower", "Rome", "Paris")
    text = fill(fact.prompt, fact.subject).text
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top1 = int(model(ids, return_type="logits")[0, -1].argmax())
    target_first = model.tokenizer(text + " Paris", add_special_tokens=True)["input_ids"][ids.shape[1]]
    assert predicts_target(model, [fact]).tolist() == [top1 == target_first]
