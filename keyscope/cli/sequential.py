"""``keyscope sequential``: ``--n`` edits one after another (each on the model edited by the ones before) with
each of ``--methods`` (deprecated ``--method``), measured at ``--checkpoints``: retention of earlier edits, locality against the unedited
model, their Rephrase/Shuffle/Long rates and, for REP, how often a gate fires on another edit's subject.

Prints the checkpoints, writes ``fig_sequential.png`` and ``sequential.csv`` into ``--out`` and with ``--json``
``{"checkpoints": [{"n_edits": …, "retention": …, "locality": …, …}, …], "methods": {…}, …}``. Every edit is
undone at the end, bit-exactly.
"""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    add_covariance_arguments,
    add_methods_argument,
    add_model_arguments,
    add_output_arguments,
    add_seed_argument,
    command_parser,
    positive_int,
)
from keyscope.cli.output import check_outputs, write_json


def parse_checkpoints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise KeyscopeError(f"--checkpoints must be comma-separated positive integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise KeyscopeError(f"--checkpoints must be comma-separated positive integers, not {text!r}")
    return values


def cmd_sequential(args) -> int:
    from keyscope.cli.common import covariance_loader, edit_inputs, parse_methods
    from keyscope.data import corpus as corpora
    from keyscope.evaluation.sequential import SequentialConfig, run_sequential
    from keyscope.studies import sequential as experiment

    methods = parse_methods(args.methods)
    checkpoints = parse_checkpoints(args.checkpoints)
    n = args.n if args.n is not None else max(checkpoints)
    if args.batch_size < 1:
        raise KeyscopeError("--batch-size must be at least 1")
    config = SequentialConfig(n=n, checkpoints=tuple(c for c in checkpoints) + ((n,) if n not in checkpoints else ()),
                              seed=args.seed, edit_batch=args.batch_size)
    check_outputs(folders={"--out": args.out}, files={"--json": args.json})
    facts, model, layer, cov, source = edit_inputs(args)
    progress = not args.no_progress

    result = run_sequential(model, facts, layer, cov, corpora.ContextSource(args.context or source), methods, config,
                            corpus=source, load_covariance=covariance_loader(model, args), progress=progress)
    print(experiment.format_table(result))
    print(f"weights restored bit-exactly: {result.weights_restored}")
    for path in experiment.write(result, args.out):
        print(f"wrote {path}")
    write_json(args.json, result.as_json())
    return 0


def register(sub) -> None:
    """Add ``keyscope sequential`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "sequential", help="N edits one after another: retention, locality, robustness at checkpoints",
        description="Sequential editing: --n edits one after another, each computed on the model the earlier ones "
                    "edited, with each method of --methods; at each of --checkpoints it measures the retention "
                    "(Success of the earlier edits), Locality against the unedited model, their Rephrase, Shuffle "
                    "and Long rates and, for REP, how often a gate fires on another edit's subject. Every edit is "
                    "undone bit-exactly at the end. Writes fig_sequential.png and sequential.csv into --out.",
        examples=["keyscope sequential --methods rome,rome+rep --n 20 --checkpoints 5,10,20",
                  "keyscope sequential --methods rome,rome+rep,memit,memit+rep --n 50 --checkpoints 10,20,30,40,50 "
                  "--out figures/sequential --json sequential50.json"])
    add_model_arguments(p)
    add_methods_argument(p, "rome", aliases=("--method",),
                         help="comma-separated editing methods (rome, rome+rep, memit, memit+rep; default rome), "
                              "one line each")
    p.add_argument("--n", type=positive_int, help="number of sequential edits (default: the last checkpoint)")
    p.add_argument("--checkpoints", default="10,50,100", help="measure after these numbers of edits (default 10,50,100)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="facts per edit for batched methods (MEMIT; default 1); others edit one fact at a time")
    add_seed_argument(p, "the facts and probes")
    p.add_argument("--corpus", help="corpus for C and REP's negatives (default: the model's default corpus)")
    p.add_argument("--context", help="text for the long contexts (default: the corpus)")
    add_covariance_arguments(p)
    add_output_arguments(p, "fig_sequential.png and sequential.csv")
    p.set_defaults(func=cmd_sequential)
