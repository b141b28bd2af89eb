"""``keyscope covariance``: the key covariance ``C`` of one or several layers as a job of its own.

Computes and caches ``C`` exactly as every other command's ``load_or_compute_covariance`` does (same cache
entries), several layers in one pass over the corpus, with checkpoints every ``--checkpoint-every`` seconds
and ``--resume`` after a stop (:mod:`keyscope.analysis.covariance_job`). Under ``torchrun --nproc_per_node K -m keyscope
covariance …`` each process takes every K-th batch and rank 0 writes the cache and ``--json``
(:mod:`keyscope._infra.distributed`).
"""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    BATCH_SIZE_HELP,
    MODEL_HELP,
    add_cov_tokens_argument,
    add_device_argument,
    add_dtype_argument,
    add_progress_argument,
    command_parser,
    dtype_of,
    positive_int,
)
from keyscope.cli.output import check_outputs, write_json


def _layers(args) -> list[int] | None:
    """``--layer`` or ``--layers`` as a list, ``None`` for the model's default layer (checked before the model loads)."""
    from keyscope.analysis.covariance_job import parse_layers

    if args.layer is not None and args.layers is not None:
        raise KeyscopeError("give --layer or --layers, not both")
    if args.layers is not None:
        try:
            return parse_layers(args.layers)
        except ValueError as exc:
            raise KeyscopeError(f"--layers: {exc}") from exc
    return None if args.layer is None else [args.layer]


def cmd_covariance(args) -> int:
    from keyscope._infra import distributed
    from keyscope._infra.memory import corpus_batch_size
    from keyscope.analysis.covariance_job import CovarianceJob, compute_covariances, summary
    from keyscope.data import corpus as corpora
    from keyscope.model.models import check_layer, default_layer, load_model

    dtype = dtype_of(args)
    if not args.checkpoint_every >= 0:  # also NaN
        raise KeyscopeError(f"--checkpoint-every must be ≥ 0 seconds, not {args.checkpoint_every}")
    requested = _layers(args)
    world = distributed.from_env()
    if world.is_main:
        check_outputs(files={"--json": args.json})
    device = distributed.device_for(world, args.device)
    with distributed.process_group(world, device):
        model = load_model(args.model, device=device, dtype=dtype)
        layers = [check_layer(model, layer) for layer in requested or [default_layer(model)]]
        source = args.corpus or corpora.default_corpus(model)
        batch_size = corpus_batch_size(model, args.seq_len, layers, args.batch_size, world)
        job = CovarianceJob(tuple(layers), n_tokens=args.cov_tokens, seq_len=args.seq_len, batch_size=batch_size,
                            checkpoint_every=args.checkpoint_every)
        result = compute_covariances(model, job, source, world=world, recompute=args.recompute, resume=args.resume,
                                     progress=not args.no_progress)
    if not world.is_main:
        return 0
    report = summary(result, args.model, str(source))
    for entry in report["layers"]:
        how = "cached" if entry["from_cache"] else "computed"
        print(f"{args.model}, layer {entry['layer']}: C ({entry['d_mlp']}×{entry['d_mlp']}) from "
              f"{entry['n_tokens']:,} tokens of {source}, {how}: {entry['cache']}")
    if result.tokens_this_run:
        resumed = f", {result.resumed_tokens:,} restored from a checkpoint" if result.resumed_tokens else ""
        procs = f" on {world.size} processes" if world.distributed else ""
        print(f"{result.tokens_this_run:,} tokens in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} "
              f"tokens/s){procs}{resumed}")
    write_json(args.json, report)
    return 0


def register(sub) -> None:
    """Add ``keyscope covariance`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "covariance", help="compute and cache the key covariance C of one or several layers "
                                "(resumable; torchrun for several processes)",
        description="Computes and caches the key covariance C = E[k k^T] of one or several layers over --cov-tokens "
                    "corpus tokens, exactly as every other command computes it (the same cache entries, so they "
                    "find it), several layers in one pass over the corpus, with checkpoints every "
                    "--checkpoint-every seconds and --resume after a stop. Under torchrun --nproc_per_node K -m "
                    "keyscope covariance each process takes every K-th batch and rank 0 writes the cache.",
        examples=["keyscope covariance --cov-tokens 200000",
                  "keyscope covariance --model meta-llama/Llama-2-7b-hf --layers 3-8 --cov-tokens 10000000 "
                  "--device cuda --json cov.json"])
    p.add_argument("--model", default="factworld", help=MODEL_HELP)
    p.add_argument("--layer", type=int, help="key layer (default: the model's default edit layer)")
    p.add_argument("--layers", help="several layers in one pass, e.g. 3-8 or 2,5,9")
    p.add_argument("--corpus", help="corpus (default: factworld filler for factworld, WikiText-103 otherwise; "
                                    "or a text file/folder)")
    add_cov_tokens_argument(p)
    p.add_argument("--seq-len", type=positive_int, default=256, help="window length fed to the model (default 256)")
    p.add_argument("--batch-size", type=positive_int, help=BATCH_SIZE_HELP)
    add_dtype_argument(p)  # the default is what the other commands load, so they find the cache
    add_device_argument(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of the same job")
    p.add_argument("--checkpoint-every", type=float, default=300.0, metavar="SECONDS",
                   help="seconds between checkpoints of the raw sums (default 300; 0: after every batch)")
    p.add_argument("--recompute", action="store_true", help="recompute C even if cached")
    add_progress_argument(p)
    p.add_argument("--json", metavar="PATH", help="also write tokens, seconds and tokens/s (overall and per layer)")
    p.set_defaults(func=cmd_covariance)
