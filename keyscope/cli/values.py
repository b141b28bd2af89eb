"""``keyscope values``: Figure 5 — ROME's edited values are "loud voices" — and the quality of the edits.

Edits ``--n`` random counterfactual facts the model knows, one at a time (each undone before the next), with
the published ROME hyper-parameters of the model's family; prints efficacy (new target top-1 on the edit
prompt), locality (neighbourhood prompts whose top-1 is unchanged), paraphrase and rephrased-subject top-1
rates, seconds per edit and the median value norm at ``k*`` before (``‖W k* (+b)‖``) and after (``‖v*‖``) the
edit, and writes ``fig5_value_norms.png`` and ``fig5_value_norms.csv`` into ``--out``.
"""

from __future__ import annotations

from keyscope.cli.common import (
    add_covariance_arguments,
    add_model_arguments,
    add_output_arguments,
    add_rome_setting_argument,
    add_seed_argument,
    command_parser,
    positive_int,
)
from keyscope.cli.output import write_json


def cmd_values(args) -> int:
    from keyscope.cli.common import check_rome_setting, edit_inputs, rome_config
    from keyscope.studies import values as experiment

    check_rome_setting(args)
    facts, model, layer, cov, _ = edit_inputs(args)
    progress = not args.no_progress
    config = experiment.ValuesConfig(layer, n=args.n, seed=args.seed, rome_config=rome_config(model, args))
    result = experiment.run(model, facts, config, cov=cov, out_dir=args.out, progress=progress)
    print(experiment.format_summary(result))
    for skip in result.skipped:
        print(f"skipped case {skip['case_id']}: {skip['reason']}")
    for path in result.files:
        print(f"wrote {path}")
    write_json(args.json, result.as_json())
    return 0


def register(sub) -> None:
    """Add ``keyscope values`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "values", help="Figure 5: value norms before/after ROME edits, and edit quality",
        description="Figure 5 of Yan et al. (ROME's edited values are 'loud voices') and the quality of the edits: "
                    "edits --n random facts the model knows, one at a time (each undone before the next), with the "
                    "published ROME hyper-parameters of the model's family; prints efficacy, locality, paraphrase "
                    "and rephrased-subject top-1 rates, seconds per edit and the median value norm at k* before "
                    "and after the edit, and writes fig5_value_norms.png and fig5_value_norms.csv into --out.",
        examples=["keyscope values --n 20",
                  "keyscope values --model smollm2-135m --data FACTS.json --corpus DIR --n 200 "
                  "--out figures/smollm2/values --json values.json"])
    add_model_arguments(p)
    p.add_argument("--n", type=positive_int, default=100, help="number of edits (default 100)")
    add_seed_argument(p, "the choice of facts")
    p.add_argument("--corpus", help="corpus for C = E[k k^T] (default: factworld filler for factworld, "
                                    "WikiText-103 otherwise; or a text file/folder)")
    add_rome_setting_argument(p)
    add_covariance_arguments(p)
    add_output_arguments(p, "the figure and CSV")
    p.set_defaults(func=cmd_values)
