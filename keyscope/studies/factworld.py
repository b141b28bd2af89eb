"""Build factworld end to end and describe a built model: train, trace, measure, check the quality bar.

``rebuild(seed, out_dir)`` is what ``keyscope factworld train`` runs:

1. train the model of :class:`~keyscope.factworld.train.TrainConfig` under ``seed`` (exactly ``steps`` steps);
2. find the edit layer with the causal trace (:func:`keyscope.analysis.trace.trace_facts`, ``trace_facts`` known facts:
   the layer whose MLP output at the subject's last token has the largest average indirect effect);
3. measure top-1 accuracy on every kind of subject form (:mod:`keyscope.factworld.quality`);
4. edit ``rome_edits`` known facts with ROME at that layer (:func:`keyscope.studies.values.run`) for the
   success and locality of the edits;
5. check everything against :data:`QUALITY_BAR`, and write the HF directory with its ``keyscope.json`` card
   (world, training run, trace, accuracies, ROME check) — only if the bar is met.

The model is trained into a temporary directory beside ``out_dir`` and moved into place at the end, so an
interrupted or failed build leaves nothing at ``out_dir``; a model below the bar is kept at
``<out_dir>.below-bar`` for inspection and the build raises :class:`BelowQualityBar`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from keyscope._infra import published
from keyscope._infra.errors import KeyscopeError
from keyscope.factworld import MODEL_CARD, export, quality
from keyscope.factworld.card import tokenizer_kind, world_of
from keyscope.factworld.train import TrainConfig, train

#: ROME settings written into every factworld card (``"rome_config"``, read by
#: :meth:`keyscope.editing.rome.ROMEConfig.for_model`): the published LLaMA settings (EasyEdit ``llama-7b.yaml``)
#: with more v* steps and context prefixes sampled from the BOS alone (kmeng01/rome). The recipe and the reason for
#: each of its fields are data: ``keyscope/editing/hparams/factworld.json`` (:data:`RECIPES` gives the citations).
RECIPES = published.load("keyscope.editing", "hparams/factworld.json", "recipe")
ROME_CONFIG = json.loads(json.dumps(RECIPES.entries()["rome"]))  # as the card holds it (JSON lists)

#: The quality bar every seed must clear: top-1 accuracies (fractions), ROME at the traced layer, and an edit
#: site above the first layer.
QUALITY_BAR = {"canonical": 0.99, "trained_aliases": 0.95, "rome_success": 0.90, "rome_locality": 0.95,
               "min_layer": 1}


class BelowQualityBar(KeyscopeError):
    """A rebuilt factworld model that does not clear :data:`QUALITY_BAR`."""


@dataclass(frozen=True)
class BuildConfig:
    """How a built model is checked. No I/O."""

    trace_facts: int = 200
    trace_samples: int = 5
    rome_edits: int = 200
    covariance_tokens: int = 100_000


def failures(card: dict) -> list[str]:
    """The parts of :data:`QUALITY_BAR` a model card does not meet, as readable strings (empty: it meets it)."""
    out = []
    accuracy = card.get("accuracy", {})
    for kind in ("canonical", "trained_aliases"):
        if accuracy.get(kind, 0.0) < QUALITY_BAR[kind]:
            out.append(f"{kind} accuracy {accuracy.get(kind, 0.0):.2%} < {QUALITY_BAR[kind]:.0%}")
    rome = card.get("rome_check", {})
    if "error" in rome:
        out.append(f"no ROME check ({rome['error']})")
    for key, bar in (("success", QUALITY_BAR["rome_success"]), ("locality", QUALITY_BAR["rome_locality"])):
        if rome.get(key) is None or rome[key] < bar:
            out.append(f"ROME {key} {rome.get(key, 0.0) or 0.0:.1%} < {bar:.0%}")
    if card.get("default_layer", 0) < QUALITY_BAR["min_layer"]:
        out.append(f"the causal trace picks layer {card.get('default_layer')} (< {QUALITY_BAR['min_layer']})")
    return out


def subject_token_counts(tokenizer, world) -> dict:
    """Tokens per canonical subject name and the fraction of name words cut into two or more pieces."""
    counts = [len(tokenizer(s.name, add_special_tokens=False)["input_ids"]) for s in world.subjects]
    words = {w for s in world.subjects for w in s.words}
    pieces = [len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
    return {"median": float(statistics.median(counts)), "mean": float(statistics.mean(counts)),
            "min": int(min(counts)), "max": int(max(counts)),
            "words_in_two_or_more_pieces": sum(p >= 2 for p in pieces) / len(pieces)}


def _measure(directory: Path, world, seed: int, config: BuildConfig, progress: bool, device: str) -> dict:
    """Accuracies, trace and the ROME check of the model in ``directory``: its card, updated (the caller writes
    it). A stage that cannot run (no known fact to trace or edit) is recorded with its error."""
    import torch

    from keyscope.analysis.covariance import load_or_compute_covariance
    from keyscope.analysis.trace import TraceConfig, trace_facts
    from keyscope.data.datasets import parse_records
    from keyscope.model.models import load_model
    from keyscope.studies import values

    card_path = directory / MODEL_CARD
    card = json.loads(card_path.read_text())
    card["rome_config"] = dict(ROME_CONFIG)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    model = load_model(str(directory), device=device, dtype=torch.float32)  # factworld is float32 on any device
    facts, _, _ = parse_records(export.records(world, seed=seed), "factworld")
    accuracy = quality.evaluate(model, model.tokenizer, world, seed=seed, progress=progress)
    card.update({"accuracy": accuracy, "tokenizer": tokenizer_kind(card),
                 "subject_tokens": subject_token_counts(model.tokenizer, world),
                 "subjects": len(world.subjects), "relations": len(world.relations), "facts": len(world.facts)})
    start = time.perf_counter()
    try:
        traced = trace_facts(model, facts, TraceConfig(n=config.trace_facts, samples=config.trace_samples, seed=seed),
                             progress=progress)
    except KeyscopeError as exc:  # a model that knows no fact: nothing to trace or edit
        card.update({"default_layer": 0, "trace": {"error": str(exc)}, "rome_check": {"error": str(exc)}})
        return card
    effects = traced.indirect_effect
    card.update({
        "default_layer": traced.layer,
        "trace": {"indirect_effect": [round(e, 4) for e in effects["mlp"]],
                  "attention_effect": [round(e, 4) for e in effects["attn"]],
                  "total_effect": round(traced.total_effect, 4), "n": len(traced.facts),
                  "samples": config.trace_samples, "seconds": round(time.perf_counter() - start, 1)},
    })
    start = time.perf_counter()
    try:
        cov = load_or_compute_covariance(model, traced.layer, n_tokens=config.covariance_tokens, progress=progress)
        check = values.run(model, facts, values.ValuesConfig(traced.layer, n=config.rome_edits, seed=seed), cov=cov,
                           progress=progress)
        card["rome_check"] = {"success": check.summary["success"], "locality": check.summary["locality"],
                              "n": check.summary["n"], "layer": traced.layer,
                              "seconds": round(time.perf_counter() - start, 1)}
    except KeyscopeError as exc:
        card["rome_check"] = {"error": str(exc), "layer": traced.layer}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card


def rebuild(seed: int = 0, out_dir: str | Path = "factworld-model", config: TrainConfig | None = None,
            export_path: str | Path | None = None, progress: bool = True, device: str = "cpu",
            build: BuildConfig | None = None) -> dict:
    """Train, trace and check factworld under ``seed`` into ``out_dir`` (module docstring); returns the card.

    Raises :class:`BelowQualityBar` (the model kept at ``<out_dir>.below-bar``, replacing any earlier one there)
    when the model misses the bar.
    """
    config = replace(config or TrainConfig(), seed=seed)
    config = replace(config, world=replace(config.world, seed=seed), tokenizer=replace(config.tokenizer, seed=seed))
    build = build or BuildConfig()
    out = Path(out_dir)
    if out.exists():
        raise KeyscopeError(f"{out} already exists; give a new --out directory or remove it")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    try:
        world, _, _, _ = train(config, out_dir=staging, progress=progress, device=device)
        card = _measure(staging, world, seed, build, progress, device)
        card["build_seconds"] = round(time.perf_counter() - start, 1)
        (staging / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n")
        missed = failures(card)
        target = out if not missed else out.with_name(f"{out.name}.below-bar")
        shutil.rmtree(target, ignore_errors=True)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if missed:
        raise BelowQualityBar(f"the factworld model for seed {seed} is below the quality bar ({'; '.join(missed)}); "
                              f"it was kept at {target} for inspection")
    if export_path is not None:
        export.write(world, export_path, seed=seed)
    return card


def info(model, progress: bool = False) -> dict:
    """What ``keyscope factworld info`` reports for a loaded factworld model: its shape, tokenizer, edit layer,
    the trace recorded at build time, and top-1 accuracies measured now (``progress``: a bar per prompt kind)."""
    from keyscope.model.models import default_layer, model_card, n_layers

    card = model_card(model)
    if card.get("name") != "factworld":
        raise KeyscopeError("this is not a factworld model (its keyscope.json card is missing or not factworld's)")
    world = world_of(card)
    seed = card.get("train_config", {}).get("seed", 0)
    accuracy = quality.evaluate(model, model.tokenizer, world, seed=seed, progress=progress)
    return {
        "accuracy": accuracy,
        "subjects": len(world.subjects),
        "relations": len(world.relations),
        "facts": len(world.facts),
        "layer": default_layer(model),
        "n_layers": n_layers(model),
        "tokenizer": tokenizer_kind(card),
        "subject_tokens": subject_token_counts(model.tokenizer, world),
        "trace": card.get("trace") or {"indirect_effect": card.get("layer_indirect_effect")},
        "rome_check": card.get("rome_check"),
        "train_seconds": card.get("train_seconds"),
        "build_seconds": card.get("build_seconds"),
    }
