"""Try a factworld training recipe: train it, trace it, measure accuracy and ROME at the traced layer.

This is how factworld v4's recipe was chosen (docs/history.md): each variant overrides fields of
:class:`keyscope.factworld.train.TrainConfig` (``model``, ``world`` and ``tokenizer`` take dicts), and one JSON
line per variant is appended to ``--out``::

    python benchmarks/factworld_recipes.py --name base --out figures/factworld_recipes/cpu.jsonl \\
        --overrides '{"steps": 600, "world": {"n_subjects": 200}, "tokenizer": {"vocab_size": 1350},
                      "lm_steps": 0, "frozen_blocks": 0, "record_fraction": 0}'

Training runs on ``--device`` (``cuda`` for a quick sweep of many variants side by side); the trace, the
accuracies and ``--rome-edits`` ROME edits at the traced layer (and at ``--rome-layers``) follow on the same
device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace

import torch


def config_of(overrides: dict):
    from keyscope.factworld.train import TrainConfig

    overrides = dict(overrides)
    base = TrainConfig()
    parts = {name: replace(getattr(base, name), **overrides.pop(name, {})) for name in ("model", "world", "tokenizer")}
    return replace(base, **parts, **overrides)


def run(name: str, overrides: dict, device: str, rome_edits: int, rome_layers: list[int], trace_facts: int) -> dict:
    import itertools

    from keyscope.analysis.covariance import load_or_compute_covariance
    from keyscope.analysis.trace import TraceConfig, trace_facts
    from keyscope.data.datasets import parse_records
    from keyscope.factworld import corpus, export, quality
    from keyscope.factworld.train import train
    from keyscope.model.models import load_model
    from keyscope.studies import values
    from keyscope.studies.factworld import ROME_CONFIG

    start = time.time()
    directory = tempfile.mkdtemp(prefix=f"factworld-{name}-")
    world, tokenizer, hf_model, history = train(config_of(overrides), out_dir=directory, progress=False, device=device)
    result = {"name": name, "overrides": overrides, "device": device, "train_seconds": round(time.time() - start),
              "final_loss": sum(h["loss"] for h in history[-20:]) / 20,
              "subject_tokens_median": statistics.median(len(tokenizer(s.name, add_special_tokens=False)["input_ids"])
                                                         for s in world.subjects)}
    card_path = os.path.join(directory, "keyscope.json")
    card = json.load(open(card_path))
    json.dump({**card, "name": "factworld", "rome_config": ROME_CONFIG}, open(card_path, "w"))
    model = load_model(directory, device=device)
    result["accuracy"] = quality.evaluate(model, model.tokenizer, world, seed=0, n_long=100, progress=False)
    facts, _, _ = parse_records(export.records(world, 0), "factworld")
    traced = trace_facts(model, facts, TraceConfig(n=trace_facts), progress=False).as_json()
    result["trace"] = {"layer": traced["layer"], "mlp": traced["indirect_effect"]["mlp"],
                       "attn": traced["indirect_effect"]["attn"], "total_effect": traced["total_effect"]}
    docs = list(itertools.islice(corpus.filler_documents(seed=0, world=world), 300))
    result["rome"] = {}
    for layer in dict.fromkeys([traced["layer"], *rome_layers]):
        if rome_edits and layer < model.cfg.n_layers - 1:
            cov = load_or_compute_covariance(model, layer, docs, n_tokens=60_000, progress=False, root=directory)
            summary = values.run(model, facts, values.ValuesConfig(layer, n=rome_edits, seed=0), cov=cov,
                                 progress=False).summary
            result["rome"][str(layer)] = {"success": summary["success"], "locality": summary["locality"],
                                          "n": summary["n"]}
    result["total_seconds"] = round(time.time() - start)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--overrides", default="{}", help="TrainConfig fields as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rome-edits", type=int, default=20)
    parser.add_argument("--rome-layers", default="", help="layers edited besides the traced one, e.g. 1,2")
    parser.add_argument("--trace-facts", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True, help="JSON-lines file the result is appended to")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.rome_layers.split(",") if x.strip()]
    outcome = run(args.name, json.loads(args.overrides), args.device, args.rome_edits, layers, args.trace_facts)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(outcome) + "\n")
    print(json.dumps(outcome))
