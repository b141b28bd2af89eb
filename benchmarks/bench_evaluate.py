"""Seconds per evaluated fact of ``keyscope evaluate``, split into the ROME edit, REP's fit and the scoring,
and what the τ grouping saves on a Figure 7 sweep.

    python benchmarks/bench_evaluate.py                  # factworld, 20 facts
    python benchmarks/bench_evaluate.py --facts 50 --taus 0.5,0.6,0.7,0.8,0.9,0.95

Both runs of the sweep comparison score the same facts with the same fitted adaptors: once with the τ
grouping of :func:`keyscope.evaluation.evaluate.evaluate_fact` (thresholds whose gate turns on the same positions share
one forward pass; an all-off gate reuses ROME's scores), once with one pass per τ. The ratio of their scoring
times is printed; both must give identical scores (checked).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keyscope.analysis.covariance import load_or_compute_covariance  # noqa: E402
from keyscope.analysis.predictions import sample_known_facts  # noqa: E402
from keyscope.data import corpus  # noqa: E402
from keyscope.data.datasets import load_facts  # noqa: E402
from keyscope.data.perturbations import fact_probes, subject_forms  # noqa: E402
from keyscope.editing import rep, rome  # noqa: E402
from keyscope.editing.base import make_editor, prepare_context  # noqa: E402
from keyscope.editing.request import EditRequest  # noqa: E402
from keyscope.evaluation import evaluate as ev  # noqa: E402
from keyscope.evaluation.metrics import plan_queries, score_plan  # noqa: E402
from keyscope.model.models import default_layer, load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="factworld")
    parser.add_argument("--data", default="factworld")
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--taus", default="0.5,0.6,0.7,0.8,0.9,0.95")
    args = parser.parse_args()
    taus = tuple(float(t) for t in args.taus.split(","))

    model = load_model(args.model)
    layer = default_layer(model)
    source = corpus.default_corpus(model)
    cov = load_or_compute_covariance(model, layer, source, progress=False)
    facts = load_facts(args.data)
    config = ev.EvalConfig(n=args.facts)
    rome_config, rep_config = rome.ROMEConfig.for_model(model), rep.REPConfig()
    context = prepare_context(model, layer, cov, ev.METHODS, facts, source, {"rome": rome_config, "rep": rep_config},
                              config.n_corpus_negatives)
    editors = {m: make_editor(m, model, context) for m in ev.METHODS}
    chosen, _ = sample_known_facts(model, facts, args.facts)
    docs = corpus.documents(source)
    forms = subject_forms(facts)
    timings = {"queries": 0.0, "edit": 0.0, "rep": 0.0, "score (grouped)": 0.0, "score (per tau)": 0.0}
    for fact in chosen:
        start = time.perf_counter()
        queries = fact_probes(model.tokenizer, fact, docs, config.probes, exclude=forms, other_facts=facts)
        timings["queries"] += time.perf_counter() - start
        start = time.perf_counter()
        row = ev.evaluate_fact(model, fact, queries, editors, context, taus)
        total = time.perf_counter() - start
        timings["edit"] += row["seconds"]["rome"]
        timings["rep"] += row["seconds"]["rome+rep"]
        timings["score (grouped)"] += total - row["seconds"]["rome"] - row["seconds"]["rome+rep"]
        edit = rome.compute_edit(model, EditRequest(fact.prompt, fact.subject, fact.target_new, fact.target_true),
                                 layer, cov, rome_config, prefixes=context.prefixes)
        fitted = editors["rome+rep"].fit(edit, queries)
        twins = ev.near_twins(model, queries, layer, cov, rep_config, edit.prefix_keys, prefixes=context.prefixes)
        plan = plan_queries(model.tokenizer, queries, twins, config.twin_cosine)
        start = time.perf_counter()
        unedited = ev.score_targets(model, [plan.sequences[r] for r in plan.locality]).argmax
        with rome.applied(model, edit):
            score_plan(model, plan, unedited, config.batch_size)
        for name, tau in {"rome+rep": rep_config.tau, **{f"rome+rep@{t:g}": t for t in taus}}.items():
            with rep.REPEdit(rome.ROMEEdits([edit]), {(0, layer): fitted}).applied(model, tau):
                scores = score_plan(model, plan, unedited, config.batch_size)
            assert scores == row["methods"][name], (fact.case_id, name)
        timings["score (per tau)"] += time.perf_counter() - start
    n = len(chosen)
    print(f"{args.model}, layer {layer}: {n} facts, both methods, τ sweep {args.taus}")
    for name, seconds in timings.items():
        print(f"  {name:16s} {seconds / n:6.3f} s per fact")
    print(f"  scoring ratio per-τ / grouped: {timings['score (per tau)'] / timings['score (grouped)']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
