"""``keyscope trace``: causal tracing — where a model recalls its facts, and the layer ROME would edit.

Corrupts the subject's token embeddings of ``--n`` known facts and restores one layer's MLP or attention output
at the subject's last token at a time (Meng et al. 2022, §2); prints the average indirect effect per layer and
the layer with the largest MLP effect, and writes ``trace.png`` (the profile and one fact's token × layer heat
map) and ``trace.csv`` (one row per fact) into ``--out``.
"""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    ALWAYS_KNOWN_HELP,
    MODEL_HELP,
    add_device_argument,
    add_dtype_argument,
    add_known_argument,
    add_output_arguments,
    add_seed_argument,
    command_parser,
    positive_int,
)
from keyscope.cli.output import write_json


def cmd_trace(args) -> int:
    from keyscope.analysis.trace import TraceConfig
    from keyscope.cli.common import data_source, dtype_of
    from keyscope.data.datasets import load_facts
    from keyscope.model.models import load_model
    from keyscope.studies import trace as experiment

    try:
        config = TraceConfig(n=args.n, noise_scale=args.noise, samples=args.samples, window=args.window,
                             seed=args.seed)
    except ValueError as exc:
        raise KeyscopeError(str(exc)) from exc
    dtype = dtype_of(args)
    facts = load_facts(data_source(args))
    if args.case is not None:
        experiment.find_case(facts, args.case)  # an unknown id fails before the trace
    model = load_model(args.model, device=args.device, dtype=dtype)
    report = experiment.run(model, facts, config, out_dir=args.out, case=args.case,
                            progress=not args.no_progress)
    print(experiment.format_summary(report))
    for path in report.files:
        print(f"wrote {path}")
    write_json(args.json, report.as_json())
    return 0


def register(sub) -> None:
    """Add ``keyscope trace`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "trace", help="causal tracing: indirect effect of each layer at the subject's last token, and the layer "
                           "to edit",
        description="Causal tracing (Meng et al. 2022, section 2): corrupts the subject's token embeddings of --n "
                    "facts the model knows and restores the MLP or attention output of --window layers at a time "
                    "at the subject's last token; prints the average indirect effect per layer and the layer with "
                    "the largest MLP effect (the one ROME edits), and writes trace.png (the profile and one fact's "
                    "token x layer heat map) and trace.csv into --out.",
        examples=["keyscope trace --n 50",
                  "keyscope trace --model smollm2-135m --data known_1000.json --n 20 --window 10 "
                  "--out figures/smollm2/trace_window10"])
    p.add_argument("--model", default="factworld", help=MODEL_HELP)
    add_dtype_argument(p)
    add_device_argument(p)
    p.add_argument("--data", help="facts: factworld (default for factworld) or a CounterFact/REP/known-facts file")
    add_known_argument(p, ALWAYS_KNOWN_HELP)
    p.add_argument("--n", type=positive_int, default=200, help="known facts to trace (default 200)")
    p.add_argument("--samples", type=positive_int, default=5, help="noise draws per fact (default 5; ROME: 10)")
    p.add_argument("--noise", type=float, default=3.0, help="noise sigma in embedding standard deviations (default 3)")
    p.add_argument("--window", type=positive_int, default=1,
                   help="layers restored together, ROME's window (default 1; ROME's Figure 1: 10); not scan's and "
                        "reach's --mask-window")
    p.add_argument("--case", help="case id of the fact shown as a token x layer heat map (default: the first traced)")
    add_seed_argument(p, "the facts traced and the noise")
    add_output_arguments(p, "trace.png and trace.csv")
    p.set_defaults(func=cmd_trace)
