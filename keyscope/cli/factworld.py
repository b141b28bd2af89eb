"""``keyscope factworld``: the embedded world and model.

* ``keyscope factworld info [--model DIR] [--json PATH]`` — the shipped (or a rebuilt) factworld model's
  accuracies, world sizes and default edit layer;
* ``keyscope factworld train [--seed S] [--out DIR]`` — rebuild world and model deterministically.
"""

from __future__ import annotations

import sys

from keyscope.cli.output import write_json
from keyscope.errors import KeyscopeError


def _accuracy_table(accuracy: dict) -> str:
    from keyscope.factworld.build import QUALITY_BAR

    lines = [f"{'prompt kind':<18}{'top-1 accuracy':>16}{'bar':>8}"]
    for kind, value in accuracy.items():
        bar = f">={QUALITY_BAR[kind]:.0%}" if kind in QUALITY_BAR else "-"
        lines.append(f"{kind:<18}{value:>16.2%}{bar:>8}")
    return "\n".join(lines)


def cmd_factworld_info(args) -> int:
    from keyscope.factworld import quality
    from keyscope.factworld.build import world_of
    from keyscope.models import default_layer, load_model, model_card

    model = load_model(args.model)
    card = model_card(model)
    if card.get("name") != "factworld":
        raise KeyscopeError(f"{args.model} is not a factworld model (its keyscope.json card is missing or not factworld's)")
    world = world_of(card)
    accuracy = quality.evaluate(model, model.tokenizer, world, seed=card.get("train_config", {}).get("seed", 0))
    layer = default_layer(model)
    report = {
        "accuracy": accuracy,
        "subjects": len(world.subjects),
        "relations": len(world.relations),
        "facts": len(world.facts),
        "layer": layer,
    }
    print(f"factworld model: {args.model}  (world seed {world.config.seed})")
    print(f"subjects {report['subjects']}, relations {report['relations']}, facts {report['facts']}, "
          f"default edit layer {layer} of {model.cfg.n_layers}")
    print(_accuracy_table(accuracy))
    write_json(args.json, report)
    return 0


def cmd_factworld_train(args) -> int:
    from keyscope.factworld.build import meets_bar, rebuild

    card = rebuild(seed=args.seed, out_dir=args.out, export_path=args.export)
    print(f"saved the factworld model for seed {args.seed} to {args.out} "
          f"({card['steps_run']} steps, {card['train_seconds']:.0f} s); default edit layer {card['default_layer']}")
    print(_accuracy_table(card["accuracy"]))
    print(f"use it with: keyscope factworld info --model {args.out}")
    if not meets_bar(card["accuracy"]):
        print("warning: this model is below the factworld quality bar", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    """Add ``keyscope factworld {info,train}`` to the top-level subparsers ``sub``."""
    fw = sub.add_parser("factworld", help="the embedded knowledge world and its model")
    fw_sub = fw.add_subparsers(dest="factworld_command", required=True)
    info = fw_sub.add_parser("info", help="accuracies, world sizes and default edit layer of a factworld model")
    info.add_argument("--model", default="factworld", help="factworld model directory (default: the shipped one)")
    info.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    info.set_defaults(func=cmd_factworld_info)
    train = fw_sub.add_parser("train", help="rebuild the world and model deterministically from a seed")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default="factworld-model", help="output HF directory (default: ./factworld-model)")
    train.add_argument("--export", metavar="PATH", help="also write the facts as CounterFact/REP JSON records")
    train.set_defaults(func=cmd_factworld_train)
