"""``keyscope reach``: which contexts an edit will change, shown before it is applied, then checked.

Computes the edit (``--methods``, one method of the registry; deprecated ``--method``; no saved model is touched), scores
every position of ``--scan-tokens`` corpus tokens (deprecated ``--tokens``) by the edit's strength ``s(k)``
(``kᵀC⁻¹k*/k*ᵀC⁻¹k*`` for ROME, ``α(k̂)`` of the adapted key under ROME+REP, the largest over the edited layers),
and prints the ``--top-k`` unrelated positions (deprecated ``--top``)
(decoded prefix, ``s(k)``), the subject's own rephrased, shuffled and long-context forms with their ``s(k)``
(what the edit will miss) and a one-line verdict. Then it applies the edit reversibly and measures the KL of
the next-token distribution and top-1 flips at those positions and at as many random ones (``--seed``):
precision@K and the Spearman correlation of ``s(k)`` with the KL. Writes ``reach.png`` into ``--out``.

    keyscope reach --case 0 --scan-tokens 100000 --top-k 20 --json reach.json
    keyscope reach --subject "Danielle Darrieux" --prompt "{}'s mother tongue is" --target English --model gpt2-xl
    keyscope reach --n 50 --scan-tokens 50000 --out figures --json figures/reach_50.json   # 50 known facts
"""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    MODEL_HELP,
    add_cov_tokens_argument,
    add_device_argument,
    add_dtype_argument,
    add_known_argument,
    add_mask_window_argument,
    add_methods_argument,
    add_option,
    add_output_arguments,
    add_rome_setting_argument,
    add_scan_tokens_argument,
    add_seed_argument,
    command_parser,
    positive_int,
)
from keyscope.cli.edit import KNOWN_EDIT_HELP, add_probe_arguments, add_request_arguments
from keyscope.cli.output import check_outputs, write_json


def _config(args):
    from keyscope.evaluation.reach import ReachConfig

    try:
        return ReachConfig(n_tokens=args.scan_tokens, top_k=args.top_k, seed=args.seed, window=args.mask_window)
    except ValueError as exc:
        message = str(exc)
        for field, option in (("n_tokens", "--scan-tokens"), ("top_k", "--top-k"), ("window", "--mask-window")):
            message = message.replace(f"ScanConfig.{field}", option)
        raise KeyscopeError(message) from exc


def one_method(text: str) -> str:
    """``--methods`` of reach: exactly one method of the registry, or a one-line error."""
    from keyscope.cli.common import parse_methods

    methods = parse_methods(text)
    if len(methods) != 1:
        raise KeyscopeError(f"--methods: reach shows one edit's reach, so it takes one method, not {len(methods)} "
                            f"({','.join(methods)}); run it once per method")
    return methods[0]


def cmd_reach(args) -> int:
    from keyscope.cli.common import check_rome_setting, covariance, data_source, model_and_layer, rome_config
    from keyscope.cli.edit import edit_request, known_request_facts
    from keyscope.data import corpus as corpora
    from keyscope.data.datasets import load_facts
    from keyscope.editing.base import check_methods
    from keyscope.studies import reach as experiment
    from keyscope.studies.edit import ProbeConfig, edit_probes

    config = _config(args)
    if args.shuffles < 0 or args.context_tokens < 0 or args.cov_tokens < 1:
        raise KeyscopeError("--shuffles and --context-tokens must be >= 0 and --cov-tokens >= 1")
    if args.n is not None and (args.n < 1 or args.case is not None or args.subject or args.prompt or args.target):
        raise KeyscopeError("--n takes a positive number of facts and no --case, --subject, --prompt or --target")
    method = one_method(args.methods)
    check_methods([method])
    check_rome_setting(args)
    check_outputs(folders={"--out": args.out}, files={"--json": args.json})
    if args.n is not None:
        request, fact, facts = None, None, load_facts(data_source(args))
    else:
        request, fact, facts = edit_request(args)
    model, layer = model_and_layer(args)
    if args.n is None:  # --n draws known facts anyway, and its edits use all of --data (--known is always on)
        facts = known_request_facts(args, model, fact, facts)
    progress = not args.no_progress
    cov, source = covariance(model, layer, args, args.cov_tokens, progress=progress)
    probe_config = ProbeConfig(edit_probes(args.shuffles, args.context_tokens, args.seed))
    reacher_config = experiment.ReacherConfig(layer, method, config, probe_config, rome_config(model, args))
    reacher = experiment.Reacher(model, reacher_config, cov=cov, corpus=source, facts=facts,
                                 context_docs=corpora.ContextSource(source),
                                 load_covariance=lambda other: covariance(model, other, args, args.cov_tokens,
                                                                          progress=progress)[0])
    if args.n is not None:
        report = experiment.run_many(reacher, args.n, out_dir=args.out, progress=progress)
        print(experiment.format_many(report))
    else:
        report = experiment.run(reacher, request, out_dir=args.out, fact=fact, progress=progress)
        print(experiment.format_report(report))
    for path in report.files:
        print(f"wrote {path}")
    write_json(args.json, report.as_json())
    return 0


def register(sub) -> None:
    """Add ``keyscope reach`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "reach", help="an edit's reach before it is applied: the corpus positions it changes most, the subject's "
                           "forms it misses, and a check of the prediction",
        description="Which contexts an edit will change, shown before it is applied, then checked: computes the "
                    "edit (one method of the registry; the model is not changed), scores every position of "
                    "--scan-tokens corpus tokens by the edit's strength s(k), and prints the --top-k unrelated "
                    "positions it reaches most, the subject's own rephrased, shuffled and long-context forms with "
                    "their s(k) (what the edit will miss) and a verdict. Then it applies the edit reversibly and "
                    "measures the KL of the next-token distribution and top-1 flips at those positions and at as "
                    "many random ones (precision@K, Spearman). Writes reach.png into --out; with --n, the reach of "
                    "N known facts summarised (reach_edits.csv, reach_edits.png).",
        examples=["keyscope reach --case 0 --scan-tokens 100000 --top-k 20 --json reach.json",
                  "keyscope reach --n 50 --methods rome+rep --scan-tokens 50000 --out figures/reach_rep"])
    add_request_arguments(p)
    p.add_argument("--n", type=positive_int, help="instead of one edit: the reach of N known facts of --data drawn with "
                                         "--seed, summarised (reach_edits.csv, reach_edits.png)")
    p.add_argument("--data", help="facts for --case/--n: factworld (default for factworld) or a CounterFact/REP file")
    add_known_argument(p, f"{KNOWN_EDIT_HELP}. With --n it changes nothing: --n draws only facts the model knows "
                          f"(always on)")
    p.add_argument("--model", default="factworld", help=MODEL_HELP)
    add_dtype_argument(p)
    add_device_argument(p)
    p.add_argument("--layer", type=int, help="edit layer (default: the model's default edit layer)")
    add_methods_argument(p, "rome", aliases=("--method",),
                         help="the editing method of the registry, one (default rome; e.g. rome+rep)")
    p.add_argument("--corpus", help="corpus to scan, for C and the long context (default: factworld filler for "
                                    "factworld, WikiText-103 otherwise; or a text file/folder)")
    add_scan_tokens_argument(p, 100_000, aliases=("--tokens",))
    add_cov_tokens_argument(p, aliases=(), note="; here the deprecated --tokens is --scan-tokens")
    p.add_argument("--recompute", action="store_true", help="recompute C even if cached")
    add_option(p, "--top-k", deprecated=("--top",), dest="top_k", type=positive_int, default=20,
               help="positions listed and checked (default 20)")
    add_mask_window_argument(p, "the subject or a related name")
    add_seed_argument(p, "the random positions, the shuffles and --n")
    add_probe_arguments(p)
    add_rome_setting_argument(p)
    add_output_arguments(p, "reach.png", "also write everything shown as JSON")
    p.set_defaults(func=cmd_reach)
