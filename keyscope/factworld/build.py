"""Rebuild factworld end to end and describe a built model: train, locate the edit layer, export, measure.

``rebuild(seed, out_dir)`` is what ``keyscope factworld train`` runs: it trains the model of
:class:`~keyscope.factworld.train.TrainConfig` under ``seed``, finds the layer whose MLP at the subject's last
token carries the facts (:mod:`keyscope.factworld.locate`), and writes a standard HF directory whose
``keyscope.json`` card records the world, the training run, the layer's causal-trace profile and the measured
accuracies. ``world_of(card)`` rebuilds the world a model was trained on from its card.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

from keyscope.factworld import export, locate, quality
from keyscope.factworld.train import TrainConfig, train
from keyscope.factworld.world import World, WorldConfig, build_world

#: ROME settings written into every factworld card (``"rome_config"``, read by
#: :meth:`keyscope.rome.ROMEConfig.for_model`): the published LLaMA settings (EasyEdit ``llama-7b.yaml``) but 60
#: v* steps instead of 25. factworld is confident (the new target's NLL starts at 10–17 nats): on the v2 model 25
#: steps left it above 1.4 nats on 9 of 121 edits outside ``instrument``, 60 steps (early stop at loss < 0.05
#: unchanged) on 2. The shipped v3 model: 97.0% success over 100 edits (``keyscope values``).
ROME_CONFIG = {"v_num_grad_steps": 60}

#: The quality bar every seed must clear (fractions, top-1).
QUALITY_BAR = {"canonical": 0.99, "trained_aliases": 0.95}


def world_config_of(card: dict) -> WorldConfig:
    """The :class:`WorldConfig` recorded in a model card (the default world if none is recorded)."""
    raw = card.get("train_config", {}).get("world")
    if raw is None:
        return WorldConfig()
    names = {f.name for f in fields(WorldConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    values.setdefault("name_pool_share", None)  # cards written before the pool existed: unique name words
    values.setdefault("templates", 2)  # cards written before the version-3 templates
    values.setdefault("stem_share", None)  # cards written before names shared their stems
    return WorldConfig(**values)


def world_of(card: dict) -> World:
    """The world a factworld model was trained on."""
    return build_world(world_config_of(card))


def meets_bar(accuracy: dict) -> bool:
    return all(accuracy[k] >= v for k, v in QUALITY_BAR.items())


def rebuild(
    seed: int = 0,
    out_dir: str | Path = "factworld-model",
    config: TrainConfig | None = None,
    export_path: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train factworld under ``seed`` into ``out_dir``; returns the model card (also written there)."""
    config = replace(config or TrainConfig(), seed=seed)
    config = replace(config, world=replace(config.world, seed=seed))
    out = Path(out_dir)
    world, tokenizer, model, _ = train(config, out_dir=out, progress=progress)
    effects = locate.trace_mlp_layers(model, tokenizer, world, seed=seed)
    accuracy = quality.evaluate(model, tokenizer, world, seed=seed, progress=progress)
    card_path = out / "keyscope.json"
    card = json.loads(card_path.read_text())
    card.update(
        {
            "default_layer": locate.best_layer(effects),
            "rome_config": dict(ROME_CONFIG),
            "layer_indirect_effect": [round(e, 4) for e in effects],
            "accuracy": accuracy,
            "subjects": len(world.subjects),
            "relations": len(world.relations),
            "facts": len(world.facts),
        }
    )
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    if export_path is not None:
        export.write(world, export_path, seed=seed)
    return card
