from __future__ import annotations

import json

import pytest
import torch

from keyscope.factworld.tokenizer import TokenizerConfig
from keyscope.factworld.train import ModelConfig, TrainConfig, train
from keyscope.factworld.world import WorldConfig
from keyscope.studies.factworld import QUALITY_BAR, BelowQualityBar, BuildConfig, failures, rebuild

TINY = TrainConfig(
    world=WorldConfig(n_subjects=24),
    model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64),
    tokenizer=TokenizerConfig(vocab_size=1100, filler_words=20_000),  # the smallest that keeps targets whole
    steps=80,
    batch_size=32,
    long_batch_size=4,
    lr=5e-3,
    warmup=10,
)
TINY_BUILD = BuildConfig(trace_facts=12, trace_samples=2, rome_edits=3, covariance_tokens=3000)


def test_quick_training_lowers_the_loss_and_is_deterministic_in_steps():
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    try:
        torch.set_num_threads(1)
        _, _, model_a, hist = train(TINY, progress=False)
        _, _, model_b, _ = train(TINY, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.random.get_rng_state(), state)  # training leaves the global generator alone
    assert len(hist) == TINY.steps  # every step runs, whatever the machine's speed
    losses = [h["loss"] for h in hist]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_model_below_the_bar_is_an_error_and_leaves_nothing_at_out(tmp_path):
    out = tmp_path / "fw"
    with pytest.raises(BelowQualityBar, match="below the quality bar"):
        rebuild(seed=0, out_dir=out, config=TINY, export_path=tmp_path / "facts.json", progress=False,
                build=TINY_BUILD)
    assert not out.exists() and not (tmp_path / "facts.json").exists()
    kept = tmp_path / "fw.below-bar"
    card = json.loads((kept / "keyscope.json").read_text())
    assert set(card["accuracy"]) == {"canonical", "trained_aliases", "alias_only", "shuffled", "long_context"}
    assert 0 <= card["default_layer"] < 2 and len(card["trace"]["indirect_effect"]) == 2
    assert card["tokenizer"] == "bpe" and card["rome_check"]["n"] >= 1 and failures(card)
    assert not list(tmp_path.glob(".*partial*"))
    from keyscope.model.models import default_layer, load_model

    assert default_layer(load_model(str(kept))) == card["default_layer"]
    with pytest.raises(Exception, match="already exists"):
        rebuild(seed=0, out_dir=kept, config=TINY, progress=False, build=TINY_BUILD)


def test_the_bar_names_every_miss():
    good = {"accuracy": {"canonical": 1.0, "trained_aliases": 0.99}, "default_layer": 2,
            "rome_check": {"success": 0.95, "locality": 0.97}}
    assert failures(good) == []
    bad = {**good, "default_layer": 0, "rome_check": {"success": 0.5, "locality": 0.97},
           "accuracy": {"canonical": 0.9, "trained_aliases": 0.99}}
    missed = failures(bad)
    assert len(missed) == 3 and any("layer 0" in m for m in missed) and any("canonical" in m for m in missed)
    assert QUALITY_BAR["min_layer"] == 1


def test_a_model_that_meets_the_bar_is_moved_to_out_with_its_export(tmp_path, monkeypatch):
    from keyscope.studies import factworld as fw

    monkeypatch.setattr(fw, "QUALITY_BAR", {"canonical": 0.0, "trained_aliases": 0.0, "rome_success": 0.0,
                                            "rome_locality": 0.0, "min_layer": 0})
    out, facts = tmp_path / "fw", tmp_path / "facts.json"
    card = rebuild(seed=0, out_dir=out, config=TINY, export_path=facts, progress=False, build=TINY_BUILD)
    assert (out / "keyscope.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "keyscope.json").read_text()) == card
    records = json.loads(facts.read_text())
    assert len(records) > 0 and {"subject", "prompt", "target_true"} <= set(records[0])
    assert not list(tmp_path.glob(".*partial*")) and not (tmp_path / "fw.below-bar").exists()


def test_train_config_rejects_schedules_it_cannot_run():
    with pytest.raises(ValueError):
        TrainConfig(warmup=0)
    with pytest.raises(ValueError):
        TrainConfig(batch_size=3)
