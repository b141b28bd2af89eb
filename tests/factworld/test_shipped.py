"""The factworld model shipped inside the package."""

from __future__ import annotations

import pytest

from keyscope.factworld import quality
from keyscope.factworld.card import world_of
from keyscope.model.models import default_layer, load_model, model_card
from keyscope.studies.factworld import QUALITY_BAR


@pytest.fixture(scope="module")
def shipped():
    model = load_model("factworld", device="cpu")
    return model, world_of(model_card(model))


def test_shipped_model_is_a_llama_bridge_with_a_card(shipped):
    model, world = shipped
    assert type(model).__name__ == "TransformerBridge"
    assert model.original_model.config.model_type == "llama"
    card = model_card(model)
    assert card["name"] == "factworld" and 0 <= default_layer(model) < model.cfg.n_layers
    assert card["facts"] == len(world.facts) and card["subjects"] == len(world.subjects) >= 500


@pytest.mark.parametrize("kind", ["canonical", "trained_aliases"])
def test_shipped_model_knows_its_facts_under_the_names_it_was_trained_on(shipped, kind):
    model, world = shipped
    prompts, targets = [], []
    for fact in world.facts:
        subject = world.subject(fact.subject_id)
        names = [subject.name] if kind == "canonical" else subject.trained_aliases
        for template in world.relation(fact.relation_id).templates:
            prompts += [template.format(name) for name in names]
            targets += [fact.target] * len(names)
    step = 1 if kind == "canonical" else 3  # every third alias prompt: as many as the canonical ones
    prompts, targets = prompts[::step], targets[::step]
    assert len(prompts) >= len(world.facts)
    accuracy = quality.top1_accuracy(model, model.tokenizer, prompts, targets)
    assert accuracy >= QUALITY_BAR[kind]
