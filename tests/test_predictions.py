from __future__ import annotations

import pytest
import torch

from keyscope.models import load_model
from keyscope.predictions import decode_token, next_token_top_k, prompt_context, target_context

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
    from keyscope.predictions import score_targets, target_sequence

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
