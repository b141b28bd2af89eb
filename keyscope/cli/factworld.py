"""``keyscope factworld``: the embedded world and model.

* ``keyscope factworld info [--model DIR] [--json PATH]`` — the shipped (or a rebuilt) factworld model's
  shape, tokenizer, edit layer and causal trace, and its accuracies measured now;
* ``keyscope factworld train [--seed S] [--out DIR] [--device cpu|cuda]`` — rebuild world and model
  deterministically and check the quality bar (a model below it is an error).
"""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import add_progress_argument
from keyscope.cli.output import write_json


def _accuracy_table(accuracy: dict) -> str:
    from keyscope.studies.factworld import QUALITY_BAR

    lines = [f"{'prompt kind':<18}{'top-1 accuracy':>16}{'bar':>8}"]
    for kind, value in accuracy.items():
        bar = f">={QUALITY_BAR[kind]:.0%}" if kind in QUALITY_BAR else "-"
        lines.append(f"{kind:<18}{value:>16.2%}{bar:>8}")
    return "\n".join(lines)


def _describe(report: dict) -> str:
    tokens = report["subject_tokens"]
    trace = report.get("trace") or {}
    effects = trace.get("indirect_effect") or []
    lines = [
        f"subjects {report['subjects']}, relations {report['relations']}, facts {report['facts']}; "
        f"{report['n_layers']} layers, {report['tokenizer']} tokenizer, median {tokens['median']:g} tokens per subject "
        f"name ({tokens['words_in_two_or_more_pieces']:.0%} of name words in two or more pieces)",
        f"default edit layer {report['layer']} of {report['n_layers']}"
        + (f"; causal trace (MLP indirect effect per layer): {', '.join(f'{e:.3f}' for e in effects)}" if effects else ""),
    ]
    rome = report.get("rome_check")
    if rome:
        lines.append(f"ROME at layer {rome['layer']} over {rome['n']} edits: success {rome['success']:.1%}, "
                     f"locality {rome['locality']:.1%}")
    return "\n".join(lines)


def cmd_factworld_info(args) -> int:
    from keyscope.model.models import load_model
    from keyscope.studies.factworld import info

    model = load_model(args.model)
    report = info(model)
    print(f"factworld model: {args.model}")
    print(_describe(report))
    print(_accuracy_table(report["accuracy"]))
    write_json(args.json, report)
    return 0


def cmd_factworld_train(args) -> int:
    import torch

    from keyscope.studies.factworld import rebuild

    if args.device == "cuda" and not torch.cuda.is_available():
        raise KeyscopeError("--device cuda: no CUDA device is available here; use --device cpu")
    card = rebuild(seed=args.seed, out_dir=args.out, export_path=args.export, progress=not args.no_progress,
                   device=args.device)
    print(f"saved the factworld model for seed {args.seed} to {args.out} ({card['steps_run']} steps, "
          f"{card['train_seconds']:.0f} s of training, {card['build_seconds']:.0f} s in all)")
    report = {**card, "layer": card["default_layer"], "n_layers": card["train_config"]["model"]["n_layers"]}
    print(_describe(report))
    print(_accuracy_table(card["accuracy"]))
    print(f"use it with: keyscope factworld info --model {args.out}")
    write_json(args.json, card)
    return 0


def register(sub) -> None:
    """Add ``keyscope factworld {info,train}`` to the top-level subparsers ``sub``."""
    fw = sub.add_parser("factworld", help="the embedded knowledge world and its model")
    fw_sub = fw.add_subparsers(dest="factworld_command", required=True)
    info = fw_sub.add_parser("info", help="shape, tokenizer, edit layer, trace and accuracies of a factworld model")
    info.add_argument("--model", default="factworld", help="factworld model directory (default: the shipped one)")
    info.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    add_progress_argument(info)
    info.set_defaults(func=cmd_factworld_info)
    train = fw_sub.add_parser("train", help="rebuild the world and model deterministically from a seed and check "
                                            "the quality bar")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default="factworld-model", help="output HF directory (default: ./factworld-model)")
    train.add_argument("--export", metavar="PATH", help="also write the facts as CounterFact/REP JSON records")
    train.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train: cpu (default) or cuda")
    add_progress_argument(train)
    train.add_argument("--json", metavar="PATH", help="also write the model card as JSON")
    train.set_defaults(func=cmd_factworld_train)
