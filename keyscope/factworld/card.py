"""What a factworld model's ``keyscope.json`` card records, read back: the world and the training run.

A model directory built by ``keyscope factworld train`` carries a card with the :class:`TrainConfig` it was
trained under (world, model shape, tokenizer, schedule), the layer its causal trace picked and its measured
quality. Cards of earlier factworld versions lack newer fields; each missing field takes the value that
reproduces the world that version built (see ``docs/history.md``).
"""

from __future__ import annotations

from dataclasses import fields

from keyscope.factworld.world import World, WorldConfig, build_world

#: World fields that cards written before they existed lack, and the value that rebuilds those cards' worlds.
_WORLD_DEFAULTS_OF_OLD_CARDS = {
    "name_pool_share": None,  # v1: every subject had words of its own
    "templates": 2,  # v1/v2 templates
    "stem_share": None,  # v1/v2: free stems
    "order_twins": False,  # v1–v3: no order twins
}


def world_config_of(card: dict) -> WorldConfig:
    """The :class:`WorldConfig` recorded in a model card (the default world if none is recorded)."""
    raw = card.get("train_config", {}).get("world")
    if raw is None:
        return WorldConfig()
    names = {f.name for f in fields(WorldConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    for name, old in _WORLD_DEFAULTS_OF_OLD_CARDS.items():
        values.setdefault(name, old)
    return WorldConfig(**values)


def world_of(card: dict) -> World:
    """The world a factworld model was trained on."""
    return build_world(world_config_of(card))


def tokenizer_kind(card: dict) -> str:
    """``"bpe"`` or ``"word"``: the tokenizer recorded in the card (cards before v4: word-level)."""
    return str(card.get("train_config", {}).get("tokenizer", {}).get("kind", "word"))
