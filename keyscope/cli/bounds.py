"""``keyscope bounds``: check the paper's lemmas on real edits of each method of ``--methods`` (Lemma 4.4: Δv
through a single attention path; Lemma 4.6: α predicts robustness; Lemma 4.7: α predicts specificity on
neighbourhood prompts and corpus-scan prefixes), for ROME, MEMIT and their REP adaptors (α of a multi-layer edit:
:meth:`keyscope.editing.base.ModelEdit.combined_strength`). Prints the summary, writes ``fig_bounds.png``,
``bounds.md`` and per-edit/per-query CSVs into ``--out`` and, with ``--json``,
``{"lemma_4_4": {"holds_fraction": …, "methods": {"rome": {…}}}, "lemma_4_6": {"auroc": …, "value_check_pearson":
…, "methods": {…}}, "lemma_4_7": {"auroc": …, "neighbourhood": {"auroc": …, "positives": …}, "corpus": {"auroc":
…, "positives": …}, "methods": {…}}}`` (top-level numbers: the first method's).
"""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    add_covariance_arguments,
    add_methods_argument,
    add_model_arguments,
    add_output_arguments,
    add_scan_tokens_argument,
    add_seed_argument,
    command_parser,
    positive_int,
)
from keyscope.cli.output import write_json

DEFAULT_METHODS = "rome,rome+rep"


def cmd_bounds(args) -> int:
    from keyscope.cli.common import covariance_loader, edit_inputs, parse_methods
    from keyscope.data import corpus as corpora
    from keyscope.evaluation import bounds
    from keyscope.studies import bounds as experiment

    methods = parse_methods(args.methods)
    if args.rome_only:
        if args.methods != DEFAULT_METHODS:
            raise KeyscopeError("--rome-only is --methods rome; give one of them")
        methods = ("rome",)
    facts, model, layer, cov, source = edit_inputs(args)
    progress = not args.no_progress
    config = bounds.BoundsConfig(n=args.n, seed=args.seed, methods=methods, scan_tokens=args.scan_tokens)
    result = bounds.run(model, facts, layer, cov, corpora.ContextSource(args.context or source), corpus=source,
                        config=config, progress=progress, load_covariance=covariance_loader(model, args))
    print(experiment.format_summary(result))
    for path in experiment.write(result, args.out):
        print(f"wrote {path}")
    write_json(args.json, result.as_json())
    return 0


def register(sub) -> None:
    """Add ``keyscope bounds`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "bounds", help="check Lemmas 4.4, 4.6 and 4.7 on real edits",
        description="Checks the paper's lemmas on real edits of each method of --methods: Lemma 4.4 (the value "
                    "change through a single attention path, and its bound), Lemma 4.6 (AUROC of the edit "
                    "strength alpha for a query's robustness) and Lemma 4.7 (AUROC of alpha for a flipped "
                    "prediction on neighbourhood prompts and on corpus-scan prefixes of --scan-tokens tokens). "
                    "Writes fig_bounds.png, bounds.md and per-edit and per-query CSVs into --out.",
        examples=["keyscope bounds --n 20",
                  "keyscope bounds --methods memit,memit+rep --n 50 --out figures/memit --json bounds.json"])
    add_model_arguments(p)
    p.add_argument("--n", type=positive_int, default=50, help="number of edited facts (default 50)")
    add_seed_argument(p, "the facts and splits")
    add_methods_argument(p, DEFAULT_METHODS)
    p.add_argument("--rome-only", action="store_true", help="ROME alone (--methods rome)")
    p.add_argument("--corpus", help="corpus for C, REP's negatives and the scan (default: the model's default)")
    p.add_argument("--context", help="text for the long contexts (default: the corpus)")
    add_covariance_arguments(p)
    add_scan_tokens_argument(p, 50_000, what=" for Lemma 4.7's prefixes")
    add_output_arguments(p, "outputs")
    p.set_defaults(func=cmd_bounds)
