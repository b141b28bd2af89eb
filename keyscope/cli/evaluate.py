"""``keyscope evaluate``: Table 1 (ROME vs ROME+REP: Success, Locality, Rephrase/Shuffle/Long in-domain and
out-of-domain) and, with ``--tau-sweep``, Figure 7.

Edits ``--n`` facts the model knows, one at a time, with each method in ``--methods``; prints the table,
writes ``table1.csv``, ``table1.md`` and ``table1_facts.csv`` (and ``fig7_tau_sweep.png``) into ``--out``, and
with ``--json`` the summary ``{"n": …, "methods": {"rome": {"success": …, …}, "rome+rep": {…}}}`` (a gated method's
entry also holds the gate diagnostics of its Locality prompts, ``gate_locality`` and the others of
:data:`keyscope.evaluation.evaluate.GATE_STATS`, which the per-fact CSV holds as counts). Under
``torchrun --nproc_per_node K -m keyscope evaluate …`` the facts (batches of ``--batch-size`` facts for a batch
editor) are shared among the processes, the per-fact rows gathered in fact order, and rank 0 alone prints and
writes (:mod:`keyscope._infra.distributed`); ``--ablate`` too.

The per-fact rows are checkpointed in the cache after every fact (every batch) and ``--resume`` continues a stopped
run to the same outputs (:class:`keyscope.evaluation.evaluate.Checkpoint`); the checkpoint is removed once they are written.
``--ablate`` too.
"""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    add_covariance_arguments,
    add_methods_argument,
    add_model_arguments,
    add_output_arguments,
    add_rome_setting_argument,
    add_seed_argument,
    command_parser,
    positive_int,
)
from keyscope.cli.output import write_json


def parse_taus(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        taus = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise KeyscopeError(f"--tau-sweep must be comma-separated numbers in (0, 1), not {text!r}") from None
    if not taus or any(not 0.0 < t < 1.0 for t in taus):
        raise KeyscopeError(f"--tau-sweep values must lie in (0, 1), not {text!r}")
    return taus


def cmd_evaluate(args) -> int:
    from dataclasses import replace

    from keyscope.cli.common import (
        check_rome_setting,
        covariance_loader,
        edit_inputs,
        parse_methods,
        rome_config,
        torchrun_world,
    )
    from keyscope.data import corpus as corpora
    from keyscope.data.perturbations import PROTOCOLS
    from keyscope.editing.base import EDITORS
    from keyscope.editing.rep import SETTINGS, REPConfig
    from keyscope.evaluation import evaluate as ev
    from keyscope.studies import ablation as experiment
    from keyscope.studies import table1

    methods = parse_methods(args.methods)
    if not 0.0 < args.tau < 1.0:
        raise KeyscopeError(f"--tau must lie in (0, 1), not {args.tau}")
    check_rome_setting(args)
    if args.protocol not in PROTOCOLS:
        raise KeyscopeError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {args.protocol!r}")
    if args.rep_setting not in SETTINGS:
        raise KeyscopeError(f"--rep-setting must be one of {', '.join(SETTINGS)}, not {args.rep_setting!r}")
    taus = parse_taus(args.tau_sweep)
    if taus and not any(EDITORS[m].gated for m in methods):
        raise KeyscopeError("--tau-sweep needs a gated method ("
                            + ", ".join(m for m in EDITORS if EDITORS[m].gated) + ")")
    if args.ablate and (taus or args.rep_setting != "keyscope" or args.rome_setting != "keyscope"
                        or set(methods) != set(ev.METHODS)):
        raise KeyscopeError("--ablate runs its own methods and settings; drop --methods, --tau-sweep, --rep-setting "
                            "and --rome-setting (--tau sets every variant's gate threshold)")
    with torchrun_world(args.device) as (world, device):
        facts, model, layer, cov, source = edit_inputs(args, world, device)
        progress = not args.no_progress
        context = args.context or source
        checkpoint = ev.Checkpoint({"context": corpora.corpus_id(context)}, resume=args.resume)
        if args.ablate:
            config = experiment.AblationConfig(layer, ev.EvalConfig(n=args.n, seed=args.seed), tau=args.tau,
                                               seed=args.seed)
            result, files = experiment.run(model, facts, config, cov=cov, context_docs=corpora.ContextSource(context),
                                           corpus=source, out_dir=args.out, progress=progress, world=world,
                                           checkpoint=checkpoint)
        else:
            rep_config = REPConfig.named(args.rep_setting, tau=args.tau)
            config = ev.EvalConfig(n=args.n, seed=args.seed, edit_batch=args.batch_size,
                                   probes=PROTOCOLS[args.protocol])
            result = ev.evaluate(model, facts, layer, cov, corpora.ContextSource(context), corpus=source,
                                 methods=methods, config=config, rome_config=rome_config(model, args),
                                 rep_config=replace(rep_config, seed=args.seed), taus=taus, progress=progress,
                                 load_covariance=covariance_loader(model, args, world), world=world,
                                 checkpoint=checkpoint)
    if not world.is_main:  # rank 0 alone prints and writes
        checkpoint.remove()
        return 0
    if args.resume:
        print(f"restored {checkpoint.restored} of {len(result.rows) + len(result.skipped)} facts from a checkpoint")
    print(experiment.format_table(result) if args.ablate else table1.format_table(result, methods))
    for skip in result.skipped:
        print(f"skipped case {skip['case_id']}: {skip['reason']}")
    for path in files if args.ablate else table1.write(result, args.out, methods):
        print(f"wrote {path}")
    write_json(args.json, result.as_json())
    checkpoint.remove()  # the outputs are written: nothing left to resume
    return 0


def register(sub) -> None:
    """Add ``keyscope evaluate`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "evaluate", help="Table 1: ROME vs ROME+REP robustness; --tau-sweep: Figure 7",
        description="Table 1 of Yan et al.: edits --n facts the model knows, one at a time (a batch editor such as "
                    "MEMIT --batch-size at a time), with each method of --methods, and measures Success, Locality "
                    "and the Rephrase, Shuffle, Word shuffle and Long rates in-domain and out-of-domain, with 95% "
                    "intervals; writes table1.csv, table1.md and table1_facts.csv into --out. --tau-sweep adds "
                    "Figure 7 (fig7_tau_sweep.png); --ablate runs the ablation of keyscope's departures instead. "
                    "Checkpointed after every fact: --resume continues a stopped run. Under torchrun "
                    "--nproc_per_node K -m keyscope evaluate the facts are shared among the processes.",
        examples=["keyscope evaluate --n 50 --methods rome,rome+rep --tau-sweep 0.5,0.7,0.9",
                  "keyscope evaluate --model smollm2-135m --data FACTS.json --known --n 30 --protocol paper "
                  "--corpus DIR --out figures/smollm2/table1 --json table1.json --resume"])
    add_model_arguments(p)
    p.add_argument("--n", "--n-facts", dest="n", type=positive_int, default=100,
                   help="number of edited facts (default 100; under torchrun write --n-facts, since torchrun "
                        "reads --n as an abbreviation of its own options)")
    add_methods_argument(p)
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="facts per edit of a batch editor (MEMIT); the others edit one fact at a time (default 1)")
    p.add_argument("--tau", type=float, default=0.9, help="REP's gate threshold (default 0.9)")
    p.add_argument("--tau-sweep", metavar="T1,T2,…", help="also evaluate REP at these thresholds (Figure 7)")
    p.add_argument("--rep-setting", default="keyscope", metavar="{keyscope,paper,released}",
                   help="REP training: keyscope's default, 'released' (the released code's setting, exactly) or "
                        "'paper' (a looser approximation of it: the released steps, lr, objective and dropout "
                        "on keyscope's training data)")
    add_rome_setting_argument(p)
    p.add_argument("--protocol", default="keyscope", metavar="{keyscope,paper}",
                   help="queries per fact: keyscope's (rephrasings 5/5, 6 token + 4 word shuffles in-domain, 3 + 3 "
                        "long contexts) or the paper's Table 1 (5 in-domain and 5 out-of-domain of each kind)")
    p.add_argument("--ablate", action="store_true",
                   help="instead of Table 1: ROME+REP under keyscope's settings, the released code's, each departure "
                        "reverted alone and each choice keyscope tried and dropped switched back on (ablation.md, "
                        "ablation.csv)")
    add_seed_argument(p, "the facts, splits and adaptors")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run of the same command from its checkpoint (the per-fact rows, kept in "
                        "the cache after every fact or batch of facts and removed once the outputs are written): the "
                        "same table as an uninterrupted run")
    p.add_argument("--corpus", help="corpus for C and REP's negatives (default: the model's default corpus)")
    p.add_argument("--context", help="text for the long contexts (default: the corpus)")
    add_covariance_arguments(p)
    add_output_arguments(p, "outputs")
    p.set_defaults(func=cmd_evaluate)
