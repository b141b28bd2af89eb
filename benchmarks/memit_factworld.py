"""MEMIT's Success and Locality on factworld for a few layer ranges and λ (``mom2_update_weight``), with ``--n``
known facts written in batches of ``--batch`` (one MEMIT edit per batch, each batch scored alone, weights
restored between batches); ``--method memit+rep`` adds REP's adaptors (trained on each fact's in-domain probes). The numbers behind factworld's ``"memit_config"`` (keyscope/factworld/model/keyscope.json).

Scored as keyscope.evaluation.evaluate scores every method: :func:`keyscope.evaluation.evaluate.plan_queries` /
:func:`keyscope.evaluation.evaluate.score_plan` on the probes of :func:`keyscope.data.perturbations.fact_probes`, Locality
against the unedited model's top-1.

    PYTHONPATH=. python benchmarks/memit_factworld.py --layers 1,2 --lam 1000 --n 50 --batch 10
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", action="append", required=True, help="comma-separated layers (repeatable)")
    parser.add_argument("--lam", type=float, action="append", required=True, help="mom2_update_weight (repeatable)")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="memit", choices=("memit", "memit+rep"))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="another MEMITConfig field (a number), e.g. v_num_grad_steps=100")
    args = parser.parse_args()

    from keyscope.analysis.covariance import load_or_compute_covariance
    from keyscope.analysis.predictions import sample_known_facts, score_targets
    from keyscope.data import corpus as corpora
    from keyscope.data.datasets import load_facts
    from keyscope.data.perturbations import PerturbationConfig, fact_probes, subject_forms
    from keyscope.editing.base import EDITORS, prepare_context
    from keyscope.editing.memit import MEMITConfig
    from keyscope.editing.request import EditRequest
    from keyscope.evaluation import evaluate as ev
    from keyscope.model.models import default_layer, load_model

    model = load_model()
    facts = load_facts("factworld")
    layer = default_layer(model)
    chosen, _ = sample_known_facts(model, facts, args.n, args.seed)
    docs = corpora.documents(corpora.default_corpus(model))
    forms = subject_forms(facts)
    plans, unedited, probes = [], [], []
    for fact in chosen:
        queries = fact_probes(model.tokenizer, fact, docs, PerturbationConfig(seed=args.seed), exclude=forms,
                              other_facts=facts)
        plan = ev.plan_queries(model.tokenizer, queries, {}, 0.95)
        probes.append(queries)
        plans.append(plan)
        unedited.append(score_targets(model, [plan.sequences[r] for r in plan.locality]).argmax)
    source = corpora.default_corpus(model)
    context = prepare_context(model, layer, load_or_compute_covariance(model, layer), [args.method], chosen, source,
                              seed=args.seed, load_covariance=lambda L: load_or_compute_covariance(model, L))
    results = []
    for layers in args.layers:
        for lam in args.lam:
            extra = {k: float(v) if "." in v or "e" in v else int(v) for k, v in (a.split("=", 1) for a in args.set)}
            config = MEMITConfig.for_model(model, layers=tuple(int(x) for x in layers.split(",")),
                                           mom2_update_weight=lam, **extra)
            editor = EDITORS[args.method](model, context, config)
            totals: dict[str, list[int]] = {}
            start = time.perf_counter()
            for lo in range(0, len(chosen), args.batch):
                batch = chosen[lo : lo + args.batch]
                edit = editor.compute([EditRequest(f.prompt, f.subject, f.target_new, f.target_true) for f in batch],
                                      probes[lo : lo + len(batch)] if editor.uses_probes else None)
                with edit.applied(model):
                    for j in range(lo, lo + len(batch)):
                        for metric, (hits, total, _) in ev.score_plan(model, plans[j], unedited[j], 32).items():
                            acc = totals.setdefault(metric, [0, 0])
                            acc[0] += hits
                            acc[1] += total
            row = {"method": args.method, "layers": list(config.layers), **extra, "mom2_update_weight": lam, "n": len(chosen), "batch": args.batch,
                   "seconds": round(time.perf_counter() - start, 1),
                   **{m: round(h / t, 4) for m, (h, t) in totals.items() if t and not m.endswith("_new")}}
            print(json.dumps(row), flush=True)
            results.append(row)


if __name__ == "__main__":
    main()
