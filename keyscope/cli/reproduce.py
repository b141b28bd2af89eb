"""``keyscope reproduce``: regenerate Figures 3, 4, 5 and 7, Table 1 and the lemma report in one run and
write ``REPORT.md`` beside them (see :mod:`keyscope.studies.reproduce`)."""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    MODEL_HELP,
    add_cov_tokens_argument,
    add_device_argument,
    add_known_argument,
    add_output_arguments,
    add_seed_argument,
    command_parser,
    positive_int,
)
from keyscope.cli.output import write_json


def cmd_reproduce(args) -> int:
    from dataclasses import replace

    from keyscope.cli.common import data_source
    from keyscope.cli.evaluate import parse_taus
    from keyscope.studies import reproduce

    data_source(args)  # the facts (or an unknown --model) before any work
    config = reproduce.ReproduceConfig(model=args.model, data=args.data, layer=args.layer, corpus=args.corpus,
                                       seed=args.seed, known=args.known, covariance_tokens=args.cov_tokens,
                                       device=args.device)
    if args.quick:
        config = replace(config, trace_facts=10, similarity_subjects=10, scan_subjects=20, scan_tokens=20_000, values_edits=5,
                         evaluate_edits=5, bounds_edits=3, taus=(0.5, 0.9))
    if args.scan_tokens is not None:
        config = replace(config, scan_tokens=args.scan_tokens)
    if args.taus:
        config = replace(config, taus=parse_taus(args.taus))
    if any(getattr(config, f) < 1 for f in ("trace_facts", "similarity_subjects", "scan_subjects", "values_edits",
                                             "evaluate_edits", "bounds_edits")):
        raise KeyscopeError("every stage needs at least one subject or edit")
    outcome = reproduce.run(config, args.out, progress=not args.no_progress)
    print(f"reproduced on {args.model}, layer {outcome['layer']} in {sum(outcome['seconds'].values()):.0f} s: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in outcome["seconds"].items()))
    print(f"wrote {outcome['report']}")
    write_json(args.json, {"seconds": outcome["seconds"], "layer": outcome["layer"], "config": outcome["config"],
                           "rep_config": outcome["rep_config"]})
    return 0


def register(sub) -> None:
    """Add ``keyscope reproduce`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "reproduce", help="every figure, Table 1 and the lemma report, and REPORT.md, in one run",
        description="Regenerates the causal trace, Figures 3, 4, 5 and 7, Table 1 and the lemma report on one model, "
                    "layer and covariance in one run with one progress bar, and writes REPORT.md beside them with "
                    "the measured numbers next to the paper's. --quick runs tiny sizes, to check the pipeline in "
                    "a minute or two.",
        examples=["keyscope reproduce --quick",
                  "keyscope reproduce --out figures --json figures/reproduce_timings.json"])
    p.add_argument("--model", default="factworld", help=MODEL_HELP)
    add_device_argument(p)
    p.add_argument("--data", help="facts (default: factworld's for factworld; required otherwise)")
    add_known_argument(p, "Figures 3 and 4 (similarity, scan) only on the facts of --data the model knows (top-1 next "
                          "token after the prompt = the first token of target_true), as those commands' --known; the "
                          "other stages draw only known facts anyway")
    p.add_argument("--layer", type=int, help="edit layer (default: the model's default edit layer)")
    p.add_argument("--corpus", help="corpus for C, scans, long contexts and REP's negatives")
    add_cov_tokens_argument(p, aliases=())
    p.add_argument("--scan-tokens", type=positive_int, metavar="N",
                   help="corpus tokens scanned for Figure 4 (default 1,000,000; 20,000 with --quick)")
    add_seed_argument(p, "every stage's draws (facts, subjects, shuffles, splits)")
    p.add_argument("--taus", metavar="T1,T2,…", help="gate thresholds of Figure 7 (default 0.5,…,0.95)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the pipeline in a minute")
    add_output_arguments(p, "every figure, CSV and REPORT.md", "also write the timings as JSON")
    p.set_defaults(func=cmd_reproduce)
