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
