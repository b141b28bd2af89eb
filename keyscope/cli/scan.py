"""``keyscope scan``: Figure 4 — the corpus positions whose keys an edit of a subject would reach.

Streams ``--scan-tokens`` corpus tokens (deprecated ``--tokens``) through the model (stopped after the layer's key),
scores every position against the keys of ``--n-subjects`` subjects (deprecated ``--subjects``) by the normalised edit
strength ``kᵀC⁻¹k*/k*ᵀC⁻¹k*``, masks each subject's own occurrences (its last token and ``--mask-window``
positions after; deprecated ``--window``), keeps the ``--top-k`` best per subject, and writes into ``--out``:

* ``fig4_neighbors.png`` — the distribution of those unrelated top-k scores next to the scores of the same
  subjects' rephrased forms (Figure 4 left);
* ``fig4_neighbors.csv`` — every hit (subject, rank, score, raw ``kᵀC⁻¹k*``, stream position, prefix);
* ``fig4_rephrase.csv`` — the scores of the subjects' rephrased forms, one row each.

It prints the best hit's prefix per subject (Figure 4 right). Under ``torchrun --nproc_per_node K -m keyscope
scan …`` each process scans every K-th batch of the corpus, the top-k lists are gathered and merged into the
single-process ones exactly (ties by stream position), and rank 0 alone writes (:mod:`keyscope._infra.distributed`).
"""

from __future__ import annotations

from dataclasses import replace

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    BATCH_SIZE_HELP,
    MODEL_HELP,
    add_cov_tokens_argument,
    add_device_argument,
    add_dtype_argument,
    add_known_argument,
    add_mask_window_argument,
    add_option,
    add_output_arguments,
    add_scan_tokens_argument,
    command_parser,
    positive_int,
)
from keyscope.cli.output import write_json


def _one_line(text: str, width: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else "…" + flat[-(width - 1):]


def cmd_scan(args) -> int:
    from keyscope.cli.common import torchrun_world

    with torchrun_world(args.device) as (world, device):
        return _scan(args, world, device)


def _scan(args, world, device) -> int:
    from keyscope._infra.memory import DEFAULT_BATCH_SIZE, corpus_batch_size
    from keyscope.analysis import scan
    from keyscope.cli.common import (
        check_subject_tokens,
        covariance,
        data_source,
        known_subset,
        model_and_layer,
    )
    from keyscope.data.datasets import read_facts
    from keyscope.studies import scan as experiment

    try:  # check the numbers before the model loads; the layer is set below
        config = scan.ScanConfig(layer=0, n_tokens=args.scan_tokens, seq_len=args.seq_len,
                                 batch_size=args.batch_size or DEFAULT_BATCH_SIZE, top_k=args.top_k,
                                 window=args.mask_window)
    except ValueError as exc:
        raise KeyscopeError(str(exc)) from exc
    data = data_source(args)
    fact_file = read_facts(data)
    model, layer = model_and_layer(args, device)
    facts = experiment.distinct_subjects(known_subset(args, model, fact_file.facts, world), args.n_subjects)
    if not facts:
        raise KeyscopeError(f"{data} holds no usable facts ({len(fact_file.failures)} records failed to load)")
    check_subject_tokens(model, facts)
    progress = not args.no_progress
    cov, source = covariance(model, layer, args, args.cov_tokens, progress=progress, world=world)
    config = replace(config, layer=layer,
                     batch_size=corpus_batch_size(model, config.seq_len, [layer], args.batch_size, world))
    report = experiment.run(model, facts, config, cov=cov, corpus=source, out_dir=args.out, model_name=args.model,
                            progress=progress, world=world)
    if not world.is_main:  # rank 0 alone prints and writes
        return 0
    result, summary = report.result, report.summary
    print(f"{args.model}, layer {layer}: scanned {result.n_tokens:,} tokens of {source} for {len(facts)} subjects "
          f"(C from {cov.n_tokens_:,} tokens; subject occurrences masked with window {config.window})")
    width = max(len(f.subject) for f in facts)
    print(f"{'subject':<{width}}  {'top-1':>7}  prefix ending at the top-1 position (strict filter)")
    for fact, hit in zip(facts, result.top1()):
        if hit is None:
            print(f"{fact.subject:<{width}}  {'-':>7}  (no unmasked position)")
        else:
            print(f"{fact.subject:<{width}}  {hit.score:7.3f}  {_one_line(hit.prefix)}")

    for name, stats in summary["filters"].items():
        median = stats["median_top10"]
        print(f"top-{config.top_k} neighbour score median, {name} filter: "
              f"{'n/a' if median is None else f'{median:.3f}'}")
    print(f"rephrased-subject score median {summary['rephrase'].get('median', float('nan')):.3f}")
    for path in report.files:
        print(f"wrote {path}")
    write_json(args.json, report.as_json(config))
    return 0


def register(sub) -> None:
    """Add ``keyscope scan`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "scan", help="Figure 4: corpus positions whose keys an edit of a subject would reach",
        description="Figure 4 of Yan et al.: streams --scan-tokens corpus tokens through the model, scores every "
                    "position against the keys of --n-subjects subjects by the normalised edit strength "
                    "k^T C^-1 k* / k*^T C^-1 k*, masks each subject's own occurrences (its last token and "
                    "--mask-window positions after), keeps the --top-k best per subject and prints each subject's "
                    "best prefix; writes fig4_neighbors.png, fig4_neighbors.csv and fig4_rephrase.csv into --out. "
                    "C comes from --cov-tokens tokens of the same corpus (cached). Under torchrun each process "
                    "scans every K-th batch and the lists are merged exactly.",
        examples=["keyscope scan --scan-tokens 200000 --n-subjects 20",
                  "keyscope scan --model smollm2-135m --data FACTS.json --known --corpus DIR --scan-tokens 1000000 "
                  "--n-subjects 100 --out figures/smollm2/scan"])
    p.add_argument("--model", default="factworld", help=MODEL_HELP)
    p.add_argument("--layer", type=int, help="key layer (default: the model's default edit layer)")
    p.add_argument("--data", help="facts: factworld (default for factworld) or a CounterFact/REP JSON file (or several "
                        "of one schema joined by commas, read as one)")
    add_known_argument(p)
    add_dtype_argument(p)
    add_device_argument(p)
    p.add_argument("--corpus", help="corpus to scan and to estimate C from (default: factworld filler for "
                                    "factworld, WikiText-103 otherwise; or a text file/folder)")
    add_scan_tokens_argument(p, 100_000, aliases=("--tokens",))
    add_option(p, "--n-subjects", deprecated=("--subjects",), dest="n_subjects", type=positive_int, default=20,
               help="number of distinct subjects (default 20)")
    p.add_argument("--top-k", type=positive_int, default=10, help="hits kept per subject (default 10)")
    add_mask_window_argument(p, "a subject")
    add_cov_tokens_argument(p, aliases=(), note="; here the deprecated --tokens is --scan-tokens")
    p.add_argument("--seq-len", type=positive_int, default=256, help="window length fed to the model (default 256)")
    p.add_argument("--batch-size", type=positive_int, help=BATCH_SIZE_HELP)
    p.add_argument("--recompute", action="store_true", help="recompute C even if cached")
    add_output_arguments(p, "the figure and CSV")
    p.set_defaults(func=cmd_scan)
