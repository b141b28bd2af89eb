"""Reproduce the paper in one run: the causal trace, Figures 3 (both panels), 4, 5 and 7, Table 1 and the lemma
report, and ``REPORT.md`` tying them together with the measured numbers next to what the paper reports.

Every stage is the library call its own command makes (``keyscope similarity``, ``scan``, ``values``,
``evaluate --tau-sweep``, ``bounds``) on one model, layer and covariance; one progress bar counts the
stages (the stages' own bars are off). :class:`ReproduceConfig` sets the sizes; its defaults finish on
factworld in well under 30 minutes on 2 CPU cores.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from keyscope import bounds as bounds_lib
from keyscope import corpus as corpora
from keyscope import evaluate as ev
from keyscope import scan as scan_lib
from keyscope.covariance import load_or_compute_covariance
from keyscope.datasets import load_facts, read_facts
from keyscope.experiments import bounds as bounds_exp
from keyscope.experiments import scan as scan_exp
from keyscope.experiments import similarity as similarity_exp
from keyscope.experiments import table1 as table1_exp
from keyscope.experiments import trace as trace_exp
from keyscope.experiments import values as values_exp
from keyscope.experiments.tables import percent
from keyscope.metrics import METRICS
from keyscope.models import default_layer, load_model, model_name
from keyscope.trace import TraceConfig

REPORT = "REPORT.md"
STAGES = ("covariance", "trace", "figure 3", "figure 4", "figure 5", "table 1 + figure 7", "bounds", "report")


@dataclass(frozen=True)
class ReproduceConfig:
    """Sizes of every stage. No I/O."""

    model: str = "factworld"
    data: str | None = None  # default: factworld's facts for factworld
    layer: int | None = None
    corpus: str | None = None
    covariance_tokens: int = 100_000
    trace_facts: int = 200
    similarity_subjects: int = 100
    scan_subjects: int = 500
    scan_tokens: int = 1_000_000
    values_edits: int = 100
    evaluate_edits: int = 400
    taus: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    bounds_edits: int = 50
    seed: int = 0


def _pct(value) -> str:
    return percent(value) + ("" if value is None else "%")


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _trace_section(trace, layer: int) -> list[str]:
    effects = trace.result.indirect_effect
    lines = ["## Causal trace: where the model recalls its facts", "", "![](trace.png)", "",
             f"{len(trace.result.facts)} known facts; the subject's token embeddings corrupted (σ = "
             f"{trace.result.config.noise_scale:g} × their standard deviation, {trace.result.config.samples} draws), one "
             "layer's output restored at the subject's last token (ROME §2). Average indirect effect on P(answer):", "",
             "| layer | " + " | ".join(str(layer) for layer in range(trace.result.n_layers)) + " |",
             "|---|" + "---:|" * trace.result.n_layers,
             "| MLP | " + " | ".join(f"{e:.3f}" for e in effects["mlp"]) + " |",
             "| attention | " + " | ".join(f"{e:.3f}" for e in effects["attn"]) + " |", "",
             f"The largest MLP effect is at layer {trace.result.layer} (total effect of the corruption "
             f"{trace.result.total_effect:.3f}); every stage below edits layer {layer}"
             + (", the same layer." if layer == trace.result.layer else
                ", the model's default (or `--layer`), **not** the layer this trace picks."), ""]
    return lines


def report(config: ReproduceConfig, layer: int, results: dict, seconds: dict) -> str:
    """``REPORT.md``: every artefact with its numbers, the paper's claim beside it."""
    sim, scan, values, table, bnd = (results[k] for k in ("similarity", "scan", "values", "evaluate", "bounds"))
    lines = [f"# keyscope reproduction of \"Keys to Robust Edits\" on `{config.model}`", "",
             f"Layer {layer}; seed {config.seed}; regenerate with `keyscope reproduce --model {config.model}`. "
             f"Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".", ""]
    if "trace" in results:
        lines += _trace_section(results["trace"], layer)
    s = sim.summary
    lines += ["## Figure 3: perturbed keys are far from the original in the whitened metric", "",
              "![](fig3_similarity.png) ![](fig3_pca.png)", "",
              "Normalised edit strength `kᵀC⁻¹k_orig / k_origᵀC⁻¹k_orig` (1 = the edit fully reaches the key):", "",
              "| perturbation | n | median | q10 | q90 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['n']} | {v['median']:.3f} | {v['q10']:.3f} | {v['q90']:.3f} |" for k, v in s.items()]
    lines += ["", "Paper: rephrased, shuffled and long-context keys of the same subject are often dissimilar "
              "(far below 1), while keys of other subjects can be close.", ""]
    filters = scan.summary["filters"]
    lines += ["## Figure 4: corpus nearest neighbours of the edited keys", "", "![](fig4_neighbors.png)", "",
              f"{scan.result.n_tokens:,} tokens scanned for {len(scan.facts)} subjects; median top-10 neighbour score "
              + "; ".join(f"{name} filter {_num(f['median_top10'])}" for name, f in filters.items())
              + f", against {_num(scan.summary['rephrase'].get('median'))} for the same subjects' rephrased forms. "
              "The paper filter drops positions whose window holds the subject's last token; the strict filter also "
              "drops the subject's name, last word, rephrased forms, family members and order twins. Paper: "
              "unrelated corpus prefixes can receive the edit as strongly as the subject's own paraphrases.", ""]
    v = values.summary
    norms = v["value_norms"]
    lines += ["## Figure 5: edited values are loud", "", "![](fig5_value_norms.png)", "",
              f"{v['n']} ROME edits: median ‖v‖ {norms['before']['median']:.3g} before, ‖v*‖ "
              f"{norms['after']['median']:.3g} after (median ratio {norms['ratio']['median']:.2f}); success "
              f"{_pct(v['success'])}, locality {_pct(v['locality'])}, {v['seconds_per_edit']:.2f} s per edit. "
              "Paper: the inserted values are far larger than ordinary ones.", ""]
    lines += ["## Table 1: ROME and ROME+REP", "", table1_exp.markdown(table).rstrip(), ""]
    if "rome" in table.summary and "rome+rep" in table.summary:
        lines += ["ROME+REP minus ROME, in points (paper: LLaMA-2-7B, Table 1; it reports no word shuffles and no "
                  "near-twin split):", "",
                  "| metric | keyscope | paper |", "|---|---:|---:|"]
        for metric in METRICS:
            a, b = table.summary["rome+rep"][metric], table.summary["rome"][metric]
            delta = None if a is None or b is None else 100 * (a - b)
            paper = table1_exp.PAPER_DELTAS.get(metric)
            lines.append(f"| {table1_exp.HEADERS[metric]} | {_num(delta, 1)} | "
                         f"{'' if paper is None else f'{paper:+.1f}'} |")
        lines.append("")
    sweep = table.tau_sweep()
    if sweep:
        shown = [m for m in METRICS if not m.endswith("_ood_new")]
        lines += ["## Figure 7: the gate threshold τ", "", "![](fig7_tau_sweep.png)", "",
                  "| τ | " + " | ".join(table1_exp.HEADERS[m] for m in shown) + " |",
                  "|---:|" + "---:|" * len(shown)]
        for tau in sorted(sweep):
            lines.append(f"| {tau:g} | " + " | ".join(_pct(sweep[tau][m]) for m in shown) + " |")
        lines.append("")
    lines += ["## The lemmas on real edits", "", "![](fig_bounds.png)", "", "```",
              bounds_exp.format_summary(bnd), "```", ""]
    return "\n".join(lines)


def run(config: ReproduceConfig, out_dir: str | Path = "figures", progress: bool = True) -> dict:
    """Run every stage into ``out_dir`` and write ``REPORT.md``; returns the stage results and timings."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(STAGES), desc="reproduce", disable=not progress)
    seconds: dict[str, float] = {}
    results: dict = {}

    def stage(name: str):
        bar.set_postfix_str(name)
        return time.perf_counter()

    def done(name: str, start: float) -> None:
        seconds[name] = time.perf_counter() - start
        bar.update(1)

    start = stage("covariance")
    model = load_model(config.model)
    name = model_name(model)
    layer = default_layer(model) if config.layer is None else config.layer
    data = config.data or ("factworld" if config.model == "factworld" else None)
    if data is None:
        from keyscope.errors import KeyscopeError

        raise KeyscopeError("give the facts (a CounterFact/REP file) for a model other than factworld")
    facts = load_facts(data)
    source = config.corpus or corpora.default_corpus(model)
    cov = load_or_compute_covariance(model, layer, source, n_tokens=config.covariance_tokens, progress=False)
    done("covariance", start)

    start = stage("trace")
    results["trace"] = trace_exp.run(model, facts, TraceConfig(n=config.trace_facts, seed=config.seed), out,
                                     progress=False)
    done("trace", start)

    start = stage("figure 3")
    results["similarity"] = similarity_exp.run(model, facts, layer, cov, corpora.documents(source), out, name,
                                               n_subjects=config.similarity_subjects, seed=config.seed,
                                               progress=False)
    done("figure 3", start)

    start = stage("figure 4")
    scan_facts = scan_exp.distinct_subjects(read_facts(data).facts, config.scan_subjects)
    scan_config = scan_lib.ScanConfig(layer=layer, n_tokens=config.scan_tokens)
    results["scan"] = scan_exp.run(model, scan_facts, cov, source, scan_config, out, name, progress=False)
    done("figure 4", start)

    start = stage("figure 5")
    results["values"] = values_exp.run(model, facts, layer, cov, out, n=config.values_edits, seed=config.seed,
                                       progress=False)
    done("figure 5", start)

    start = stage("table 1 + figure 7")
    evaluation = ev.evaluate(model, facts, layer, cov, corpora.documents(source), corpus=source,
                             config=ev.EvalConfig(n=config.evaluate_edits, seed=config.seed), taus=config.taus,
                             progress=False)
    table1_exp.write(evaluation, out)
    results["evaluate"] = evaluation
    done("table 1 + figure 7", start)

    start = stage("bounds")
    results["bounds"] = bounds_lib.run(model, facts, layer, cov, corpora.documents(source), corpus=source,
                                       config=bounds_lib.BoundsConfig(n=config.bounds_edits, seed=config.seed),
                                       progress=False)
    bounds_exp.write(results["bounds"], out)
    done("bounds", start)

    start = stage("report")
    (out / REPORT).write_text(report(config, layer, results, seconds))
    done("report", start)
    bar.close()
    return {"results": results, "seconds": seconds, "layer": layer, "config": asdict(config),
            "report": str(out / REPORT)}
