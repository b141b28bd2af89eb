"""``keyscope bounds``: check the paper's lemmas on real edits (Lemma 4.4: Δv through a single attention
path; Lemma 4.6: α predicts robustness, for ROME and ROME+REP; Lemma 4.7: α predicts specificity on
neighbourhood prompts and corpus-scan prefixes). Prints the summary, writes ``fig_bounds.png``, ``bounds.md``
and per-edit/per-query CSVs into ``--out`` and, with ``--json``,
``{"lemma_4_4": {"holds_fraction": …}, "lemma_4_6": {"auroc": …, "value_check_pearson": …}, "lemma_4_7": {"auroc": …,
"neighbourhood": {"auroc": …, "positives": …}, "corpus": {"auroc": …, "positives": …}}}``.
"""

from __future__ import annotations

from keyscope.cli.common import (
    add_covariance_arguments,
    add_model_arguments,
    add_output_arguments,
    positive_int,
)
from keyscope.cli.output import write_json


def cmd_bounds(args) -> int:
    from keyscope import bounds
    from keyscope import corpus as corpora
    from keyscope.cli.common import edit_inputs
    from keyscope.experiments import bounds as experiment

    facts, model, layer, cov, source = edit_inputs(args)
    progress = not args.no_progress
    methods = ("rome",) if args.rome_only else ("rome", "rome+rep")
    config = bounds.BoundsConfig(n=args.n, seed=args.seed, methods=methods, scan_tokens=args.scan_tokens)
    result = bounds.run(model, facts, layer, cov, corpora.documents(args.context or source), corpus=source,
                        config=config, progress=progress)
    print(experiment.format_summary(result))
    for path in experiment.write(result, args.out):
        print(f"wrote {path}")
    write_json(args.json, result.as_json())
    return 0


def register(sub) -> None:
    """Add ``keyscope bounds`` to the top-level subparsers ``sub``."""
    p = sub.add_parser("bounds", help="check Lemmas 4.4, 4.6 and 4.7 on real edits")
    add_model_arguments(p)
    p.add_argument("--n", type=positive_int, default=50, help="number of edited facts (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the facts and splits")
    p.add_argument("--rome-only", action="store_true", help="skip ROME+REP")
    p.add_argument("--corpus", help="corpus for C, REP's negatives and the scan (default: the model's default)")
    p.add_argument("--context", help="text for the long contexts (default: the corpus)")
    add_covariance_arguments(p)
    p.add_argument("--scan-tokens", type=positive_int, default=50_000, help="corpus tokens scanned for Lemma 4.7 prefixes")
    add_output_arguments(p, "outputs")
    p.set_defaults(func=cmd_bounds)
