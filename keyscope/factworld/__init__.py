"""factworld: keyscope's embedded knowledge world and the small LLaMA-architecture model trained on it.

``build_world`` generates subjects, aliases, relations and facts from a seed; ``corpus.filler_documents``
streams unrelated text; ``train`` rebuilds the model; the model shipped in ``keyscope/factworld/model/``
loads with ``keyscope.model.models.load_model("factworld")``.
"""

from pathlib import Path

from keyscope.factworld.world import Relation, Subject, World, WorldConfig, WorldFact, build_world

#: Name of the small JSON card a keyscope-built model directory carries (world, training run, default layer).
MODEL_CARD = "keyscope.json"

__all__ = ["WorldFact", "Relation", "Subject", "World", "WorldConfig", "build_world", "MODEL_CARD", "shipped_model_dir"]


def shipped_model_dir() -> Path:
    """The factworld model shipped inside the package (a standard HF directory)."""
    return Path(__file__).resolve().parent / "model"
