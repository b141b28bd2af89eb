"""The factworld model shipped inside the package."""

from __future__ import annotations

import pytest

from keyscope.experiments.factworld import QUALITY_BAR
from keyscope.factworld import quality
from keyscope.factworld.card import world_of
from keyscope.models import default_layer, load_model, model_card


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


def test_shipped_model_knows_its_canonical_facts(shipped):
    model, world = shipped
    prompts, targets = [], []
    for fact in world.facts:
        for template in world.relation(fact.relation_id).templates:
            prompts.append(template.format(world.subject(fact.subject_id).name))
            targets.append(fact.target)
    accuracy = quality.top1_accuracy(model, model.tokenizer, prompts, targets)
    assert accuracy >= QUALITY_BAR["canonical"]
