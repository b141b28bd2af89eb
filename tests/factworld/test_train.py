from __future__ import annotations

import json

import torch

from keyscope.factworld.build import rebuild
from keyscope.factworld.train import ModelConfig, TrainConfig, train
from keyscope.factworld.world import WorldConfig

TINY = TrainConfig(
    world=WorldConfig(n_subjects=24),
    model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64),
    steps=80,
    batch_size=32,
    long_batch_size=4,
    lr=5e-3,
    warmup=10,
)


def test_quick_training_lowers_the_loss_and_is_deterministic():
    torch.set_num_threads(1)
    _, _, model_a, hist = train(TINY, progress=False)
    _, _, model_b, _ = train(TINY, progress=False)
    losses = [h["loss"] for h in hist]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name


def test_rebuild_writes_a_loadable_model_with_its_card(tmp_path):
    from keyscope.models import default_layer, load_model

    card = rebuild(seed=0, out_dir=tmp_path / "fw", config=TINY, export_path=tmp_path / "facts.json", progress=False)
    assert set(card["accuracy"]) == {"canonical", "trained_aliases", "alias_only", "shuffled", "long_context"}
    assert 0 <= card["default_layer"] < 2 and len(card["layer_indirect_effect"]) == 2
    model = load_model(str(tmp_path / "fw"))
    assert default_layer(model) == card["default_layer"]
    assert len(json.loads((tmp_path / "facts.json").read_text())) == card["facts"]
