"""``keyscope reproduce``: regenerate Figures 3, 4, 5 and 7, Table 1 and the lemma report in one run and
write ``REPORT.md`` beside them (see :mod:`keyscope.studies.reproduce`)."""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import MODEL_HELP, add_known_argument, add_progress_argument
from keyscope.cli.output import write_json


def cmd_reproduce(args) -> int:
    from dataclasses import replace

    from keyscope.cli.evaluate import parse_taus
    from keyscope.studies import reproduce

    config = reproduce.ReproduceConfig(model=args.model, data=args.data, layer=args.layer, corpus=args.corpus,
                                       seed=args.seed, known=args.known)
    if args.quick:
        config = replace(config, trace_facts=10, similarity_subjects=10, scan_subjects=20, scan_tokens=20_000, values_edits=5,
                         evaluate_edits=5, bounds_edits=3, taus=(0.5, 0.9))
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
    p = sub.add_parser("reproduce", help="every figure, Table 1 and the lemma report, and REPORT.md, in one run")
    p.add_argument("--model", default="factworld", help=MODEL_HELP)
    p.add_argument("--data", help="facts (default: factworld's for factworld; required otherwise)")
    add_known_argument(p, "Figures 3 and 4 (similarity, scan) only on the facts of --data the model knows (top-1 next "
                          "token after the prompt = the first token of target_true), as those commands' --known; the "
                          "other stages draw only known facts anyway")
    p.add_argument("--layer", type=int, help="edit layer (default: the model's default edit layer)")
    p.add_argument("--corpus", help="corpus for C, scans, long contexts and REP's negatives")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--taus", metavar="T1,T2,…", help="gate thresholds of Figure 7 (default 0.5,…,0.95)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the pipeline in a minute")
    add_progress_argument(p)
    p.add_argument("--out", default="figures", help="output folder (default figures/)")
    p.add_argument("--json", metavar="PATH", help="also write the timings as JSON")
    p.set_defaults(func=cmd_reproduce)
