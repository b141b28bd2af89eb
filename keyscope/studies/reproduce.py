"""Reproduce the paper in one run: the causal trace, Figures 3 (both panels), 4, 5 and 7, Table 1 and the lemma
report, and ``REPORT.md`` tying them together with the measured numbers next to what the paper reports.

Every stage is the library call its own command makes (``keyscope similarity``, ``scan``, ``values``,
``evaluate --tau-sweep``, ``bounds``) on one model, layer and covariance; one progress bar counts the
stages (the stages' own bars are off). :class:`ReproduceConfig` sets the sizes; the run records each stage's
seconds (``figures/reproduce_timings.json`` for the committed run, rendered in ``docs/results-factworld.md``).

``REPORT.md`` is rendered by :func:`report` from the artefacts the stages wrote (CSV) and the run's record (stage
times, layer, config: what ``--json`` writes), never from results held in memory, so ``tests/test_readme.py``
re-renders the committed report from the committed artefacts and compares; ``python -m
keyscope.studies.reproduce figures`` rewrites it from them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from keyscope._infra.atomic import write_text
from keyscope.analysis import scan as scan_lib
from keyscope.analysis.covariance import load_or_compute_covariance
from keyscope.analysis.predictions import UnknownFacts, known_facts
from keyscope.analysis.trace import TraceConfig
from keyscope.data import corpus as corpora
from keyscope.data.datasets import load_facts
from keyscope.evaluation import bounds as bounds_lib
from keyscope.evaluation import evaluate as ev
from keyscope.evaluation.metrics import METRICS
from keyscope.model.models import default_layer, load_model, model_name
from keyscope.studies import artefacts
from keyscope.studies import bounds as bounds_exp
from keyscope.studies import scan as scan_exp
from keyscope.studies import similarity as similarity_exp
from keyscope.studies import table1 as table1_exp
from keyscope.studies import trace as trace_exp
from keyscope.studies import values as values_exp
from keyscope.studies.tables import percent, read_csv

REPORT = "REPORT.md"
#: Where the real model's Table 1 lies in ``figures/`` (docs/results-smollm2.md); REPORT.md shows its deltas
#: beside the reproduced model's and the paper's when it is there.
SMOLLM2_TABLE1 = "smollm2/table1"
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
    known: bool = False  # Figures 3 and 4 on the facts the model knows only (the other stages draw only those)
    device: str | None = None  # where the model runs (default: CUDA when available)


def _pct(value) -> str:
    return percent(value) + ("" if value is None else "%")


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(value: str):
    """A CSV cell back to what was written: ``None``, a bool, a number or the text."""
    if value == "":
        return None
    if value in ("True", "False"):
        return value == "True"
    try:
        return float(value)
    except ValueError:
        return value


def _typed(path: Path) -> list[dict]:
    return [{k: _cell(v) for k, v in row.items()} for row in read_csv(path)]


def _trace_section(figures: Path, config: dict, layer: int) -> list[str]:
    """The causal trace (``trace.csv``): each layer's average indirect effect and the total effect."""
    rows = _typed(figures / trace_exp.TABLE)
    n_layers = sum(k.startswith("mlp_") for k in rows[0])
    effects = {kind: [float(np.mean([r[f"{kind}_{i}"] for r in rows])) for i in range(n_layers)] for kind in ("mlp", "attn")}
    traced = max(range(n_layers), key=lambda i: effects["mlp"][i])  # as keyscope.analysis.trace.TraceResult.layer
    total = float(np.mean([r["p_clean"] - r["p_corrupted"] for r in rows]))
    settings = TraceConfig(n=config["trace_facts"], seed=config["seed"])  # the stage's settings, as run() sets them
    return ["## Causal trace: where the model recalls its facts", "", f"![]({trace_exp.FIGURE})", "",
            f"{len(rows)} known facts; the subject's token embeddings corrupted (σ = {settings.noise_scale:g} × their "
            f"standard deviation, {settings.samples} draws), one layer's output restored at the subject's last token "
            "(ROME §2). Average indirect effect on P(answer):", "",
            "| layer | " + " | ".join(str(i) for i in range(n_layers)) + " |", "|---|" + "---:|" * n_layers,
            "| MLP | " + " | ".join(f"{e:.3f}" for e in effects["mlp"]) + " |",
            "| attention | " + " | ".join(f"{e:.3f}" for e in effects["attn"]) + " |", "",
            f"The largest MLP effect is at layer {traced} (total effect of the corruption {total:.3f}); every stage "
            f"below edits layer {layer}" + (", the same layer." if layer == traced else
                                            ", the model's default (or `--layer`), **not** the layer this trace picks."),
            ""]


def _table1_summary(figures: Path) -> dict:
    """``table1.csv`` back into :func:`keyscope.evaluation.evaluate.summarize`'s form (value, ``ci``, ``counts`` per metric)."""
    out = {}
    for row in _typed(figures / table1_exp.TABLE_CSV):
        out[row["method"]] = {**{m: row[m] for m in METRICS},
                              "ci": {m: None if row[f"{m}_lo"] is None else [row[f"{m}_lo"], row[f"{m}_hi"]] for m in METRICS},
                              "counts": {m: int(row[f"{m}_prompts"]) for m in METRICS}}
    return out


def _bounds_block(figures: Path, model: str, layer: int, config: dict) -> str:
    """The lemma summary recomputed from ``bounds_edits.csv`` and ``bounds_queries.csv``
    (:func:`keyscope.evaluation.bounds.summarize`, :func:`keyscope.studies.bounds.format_summary`)."""
    queries = _typed(figures / bounds_exp.QUERIES_CSV)
    edits_path = figures / bounds_exp.EDITS_CSV
    l44 = _typed(edits_path) if edits_path.exists() else []
    n_edits = len({r["case_id"] for r in queries})
    l44 = l44 + [None] * (n_edits - len(l44))  # edits without a Lemma 4.4 row
    methods = list(dict.fromkeys(r["method"] for r in queries))
    result = bounds_lib.BoundsResult(model, layer, l44, queries, bounds_lib.summarize(l44, queries, methods),
                                     bounds_lib.BoundsConfig(n=config["bounds_edits"], seed=config["seed"]))
    return bounds_exp.format_summary(result)


def deltas_table(figures: str | Path, model: str) -> list[str]:
    """ROME+REP minus ROME per Table 1 column, in points: ``model``'s (``figures/table1.csv``), SmolLM2's (where
    ``figures/smollm2/table1/`` is committed) and the paper's on LLaMA-2-7B; a markdown table as lines, with its
    heading sentence (empty without both methods in ``table1.csv``)."""
    figures = Path(figures)
    table = _table1_summary(figures)
    if "rome" not in table or "rome+rep" not in table:
        return []
    real = figures / SMOLLM2_TABLE1
    other = _table1_summary(real) if (real / table1_exp.TABLE_CSV).exists() else None
    lines = ["ROME+REP minus ROME, in points (paper: LLaMA-2-7B, Table 1; it reports no word shuffles and no "
             "near-twin split" + ("; SmolLM2-135M: `smollm2/table1/table1.csv`, the paper's query protocol)"
                                  if other else ")") + ":", "",
             f"| metric | keyscope{f' on {model}' if other else ''} |{' keyscope on smollm2-135m |' if other else ''} paper |",
             "|---|---:|" + ("---:|" if other else "") + "---:|"]

    def delta(t: dict, metric: str) -> str:
        a, b = t["rome+rep"][metric], t["rome"][metric]
        return _num(None if a is None or b is None else 100 * (a - b), 1)

    for metric in METRICS:
        paper = table1_exp.PAPER_DELTAS.get(metric)
        lines.append(f"| {table1_exp.HEADERS[metric]} | {delta(table, metric)} |"
                     + (f" {delta(other, metric)} |" if other else "")
                     + f" {'' if paper is None else f'{paper:+.1f}'} |")
    return lines + [""]


def report(figures: str | Path, run: dict) -> str:
    """``REPORT.md`` rendered from the artefacts in ``figures`` and the run's record ``run`` (``{"seconds", "layer",
    "config"}``, what ``keyscope reproduce --json`` writes, e.g. ``figures/reproduce_timings.json``): every number
    is read from a CSV there, so ``tests/test_readme.py`` re-renders the committed report from the committed
    artefacts and compares. The paper's claims are beside the numbers."""
    figures = Path(figures)
    config, layer = run["config"], run["layer"]
    model = config["model"]
    lines = [f"# keyscope reproduction of \"Keys to Robust Edits\" on `{model}`", "",
             f"Layer {layer}; seed {config['seed']}; regenerate with `keyscope reproduce --model {model}"
             f"{' --known' if config.get('known') else ''} --out figures`. "
             f"Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in run["seconds"].items() if k != "report") + ".", ""]
    if (figures / trace_exp.TABLE).exists():
        lines += _trace_section(figures, config, layer)
    s = similarity_exp.summarize(_typed(figures / "fig3_similarity.csv"))
    lines += ["## Figure 3: perturbed keys are far from the original in the whitened metric", "",
              "![](fig3_similarity.png) ![](fig3_pca.png)", "",
              "Normalised edit strength `kᵀC⁻¹k_orig / k_origᵀC⁻¹k_orig` (1 = the edit fully reaches the key):", "",
              "| perturbation | n | median | q10 | q90 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['n']} | {v['median']:.3f} | {v['q10']:.3f} | {v['q90']:.3f} |" for k, v in s.items()]
    lines += ["", "Paper: rephrased, shuffled and long-context keys of the same subject are often dissimilar "
              "(far below 1), while keys of other subjects can be close.", ""]
    medians = artefacts.neighbour_medians(figures)
    subjects = {r["case_id"] for r in read_csv(figures / scan_exp.TABLE)}
    rephrase_path = figures / scan_exp.REPHRASE_TABLE
    rephrase = (f", against {_num(float(np.median([float(r['score']) for r in read_csv(rephrase_path)])))} for the same "
                "subjects' rephrased forms" if rephrase_path.exists() else "")
    lines += ["## Figure 4: corpus nearest neighbours of the edited keys", "", "![](fig4_neighbors.png)", "",
              f"{config['scan_tokens']:,} tokens scanned for {len(subjects)} subjects; median top-10 neighbour score "
              + "; ".join(f"{name} filter {_num(m)}" for name, m in medians.items()) + f"{rephrase}. "
              "The paper filter drops positions whose window holds the subject's last token; the strict filter also "
              "drops the subject's name, last word, rephrased forms, family members and order twins. Paper: "
              "unrelated corpus prefixes can receive the edit as strongly as the subject's own paraphrases.", ""]
    v = artefacts.value_summary(figures)
    lines += ["## Figure 5: edited values are loud", "", "![](fig5_value_norms.png)", "",
              f"{v['n']} ROME edits: median ‖v‖ {v['before']:.3g} before, ‖v*‖ {v['after']:.3g} after (median ratio "
              f"{v['ratio']:.2f}); success {_pct(v['success'])}, locality {_pct(v['locality'])}, {v['seconds']:.2f} s "
              "per edit. Paper: the inserted values are far larger than ordinary ones.", ""]
    table = _table1_summary(figures)
    names = [m for m in ev.METHODS if m in table]
    n_edits = len({r["case_id"] for r in read_csv(figures / table1_exp.FACTS_CSV) if r["method"] == names[0]})
    lines += ["## Table 1: ROME and ROME+REP", "", table1_exp.summary_markdown(table, names, n_edits, model, layer).rstrip(),
              ""]
    lines += deltas_table(figures, model)
    sweep_path = figures / table1_exp.SWEEP_CSV
    if sweep_path.exists():
        shown = [m for m in METRICS if not m.endswith("_ood_new")]
        lines += ["## Figure 7: the gate threshold τ", "", "![](fig7_tau_sweep.png)", "",
                  "| τ | " + " | ".join(table1_exp.HEADERS[m] for m in shown) + " |",
                  "|---:|" + "---:|" * len(shown)]
        for row in sorted(_typed(sweep_path), key=lambda r: r["tau"]):
            lines.append(f"| {row['tau']:g} | " + " | ".join(_pct(row[m]) for m in shown) + " |")
        lines.append("")
    lines += ["## The lemmas on real edits", "", "![](fig_bounds.png)", "", "```",
              _bounds_block(figures, model, layer, config), "```", ""]
    lines += _real_model_section(figures, model)
    return "\n".join(lines)


#: The real model of :func:`_real_model_section`: its name and folder under ``figures/``.
REAL_MODEL = ("smollm2-135m", "smollm2")


def _real_model_section(figures: Path, model: str) -> list[str]:
    """REPORT.md's section of :func:`real_model_table`, with its heading."""
    lines = real_model_table(figures, model)
    if not lines:
        return []
    name, folder = REAL_MODEL
    return [f"## {name} beside {model} and the paper", "",
            f"Each {name} number comes from `figures/{folder}/` (the commands are printed with each result on the docs' "
            f"SmolLM2 page, `docs/results-smollm2.md`); the paper's column is LLaMA-2-7B's claim, read from its figures.",
            "", *lines]


def real_model_table(figures: str | Path, model: str) -> list[str]:
    """The paper's measures side by side on ``model`` (``figures/``), SmolLM2-135M (``figures/smollm2/``: each row
    only where its artefact is committed) and what the paper reports for LLaMA-2-7B. The paper gives Figures 3–5
    and 7 as plots, so its column states the claim, not a number; only Table 1's deltas are numbers."""
    figures = Path(figures)
    name, folder = REAL_MODEL
    real = figures / folder
    if not real.is_dir():
        return []
    rows: list[tuple[str, str, str, str]] = []  # (measure, this model, SmolLM2, paper)
    labels = {"rephrase": "rephrased subject", "shuffle": "shuffled subject tokens", "shuffle_words": "shuffled subject words",
              "long": "300-token unrelated context", "random": "another subject"}
    if (real / "similarity" / similarity_exp.TABLE).exists():
        here = artefacts.similarity_strengths(figures / similarity_exp.TABLE)
        there = artefacts.similarity_strengths(real / "similarity" / similarity_exp.TABLE)
        claims = {"shuffle_words": "not reported", "random": "— (keyscope's baseline)"}
        for kind, label in labels.items():
            if kind in here and kind in there:
                rows.append((f"Figure 3: median s(k), {label}", _num(float(np.median(here[kind]))),
                             _num(float(np.median(there[kind]))), claims.get(kind, "often far below 1")))
    if (real / "scan" / scan_exp.TABLE).exists():
        here, there = artefacts.neighbour_medians(figures), artefacts.neighbour_medians(real, "scan/")
        for name_ in sorted(set(here) & set(there)):
            rows.append((f"Figure 4: median s(k) of the 10 best unrelated corpus positions, {name_} filter",
                         _num(here[name_]), _num(there[name_]), "some unrelated prefixes are close"))
    if (real / "values" / values_exp.TABLE).exists():
        here, there = artefacts.value_summary(figures), artefacts.value_summary(real, "values/")
        rows += [("Figure 5: median ‖v*‖ / ‖v‖ at k*", f"{here['ratio']:.2f}", f"{there['ratio']:.2f}",
                  "inserted values far larger than ordinary ones"),
                 ("ROME success (Figure 5's edits)", _pct(here["success"]), _pct(there["success"]), "—"),
                 ("ROME locality (Figure 5's edits)", _pct(here["locality"]), _pct(there["locality"]), "—")]
    sweep = real / "tau_sweep" / table1_exp.SWEEP_CSV
    if sweep.exists() and (figures / table1_exp.SWEEP_CSV).exists():
        (hi, lo, here), (_, _, there) = artefacts.tau_changes(figures), artefacts.tau_changes(real, "tau_sweep/")
        for metric in ("locality", "success", "rephrase_id", "shuffle_id", "long_id"):
            rows.append((f"Figure 7: {table1_exp.HEADERS[metric]}, τ {hi:g} → {lo:g} (points)", _num(here[metric], 1),
                         _num(there[metric], 1), "lower τ: more robust, less local"))
    if (real / "bounds" / bounds_exp.QUERIES_CSV).exists():
        here, there = artefacts.bounds_numbers(figures), artefacts.bounds_numbers(real, "bounds/")
        for method in ("rome", "rome+rep"):
            rows.append((f"Lemma 4.6: AUROC of α for a query's success, {method}", _num(here["lemma_4_6"][method][0], 2),
                         _num(there["lemma_4_6"][method][0], 2), "α predicts robustness"))
        for part in ("neighbourhood", "corpus"):
            rows.append((f"Lemma 4.7: AUROC of α for a flipped top-1, {part} (ROME)", _num(here[part][0], 2),
                         _num(there[part][0], 2), "α predicts collateral change"))
        rows.append(("Lemma 4.4: the Cauchy–Schwarz bound on ‖Δv‖ holds", _pct(here["norm_bound_holds"]),
                     _pct(there["norm_bound_holds"]), "a bound (holds always in theory)"))
    if not rows:
        return []
    lines = [f"| measure | {model} | {name} | paper |", "|---|---:|---:|---|"]
    lines += [f"| {measure} | {a} | {b} | {c} |" for measure, a, b, c in rows]
    return lines + [""]


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
    model = load_model(config.model, device=config.device)
    name = model_name(model)
    layer = default_layer(model) if config.layer is None else config.layer
    data = config.data or ("factworld" if config.model == "factworld" else None)
    if data is None:
        from keyscope._infra.errors import KeyscopeError

        raise KeyscopeError("give the facts (a CounterFact/REP file) for a model other than factworld")
    facts = load_facts(data)
    studied = known_facts(model, facts) if config.known else facts  # what Figures 3 and 4 study
    if not studied:
        raise UnknownFacts(f"the model knows none of the facts of {data} (--known)")
    source = config.corpus or corpora.default_corpus(model)
    cov = load_or_compute_covariance(model, layer, source, n_tokens=config.covariance_tokens, progress=False)
    done("covariance", start)

    start = stage("trace")
    results["trace"] = trace_exp.run(model, facts, TraceConfig(n=config.trace_facts, seed=config.seed), out_dir=out,
                                     progress=False)
    done("trace", start)

    start = stage("figure 3")
    results["similarity"] = similarity_exp.run(
        model, studied, similarity_exp.SimilarityConfig(layer, n_subjects=config.similarity_subjects, seed=config.seed),
        cov=cov, context_docs=corpora.ContextSource(source), out_dir=out, model_name=name, progress=False)
    done("figure 3", start)

    start = stage("figure 4")
    scan_facts = scan_exp.distinct_subjects(studied, config.scan_subjects)
    scan_config = scan_lib.ScanConfig(layer=layer, n_tokens=config.scan_tokens)
    results["scan"] = scan_exp.run(model, scan_facts, scan_config, cov=cov, corpus=source, out_dir=out, model_name=name,
                                   progress=False)
    done("figure 4", start)

    start = stage("figure 5")
    results["values"] = values_exp.run(model, facts, values_exp.ValuesConfig(layer, n=config.values_edits, seed=config.seed),
                                       cov=cov, out_dir=out, progress=False)
    done("figure 5", start)

    start = stage("table 1 + figure 7")
    evaluation = ev.evaluate(model, facts, layer, cov, corpora.ContextSource(source), corpus=source,
                             config=ev.EvalConfig(n=config.evaluate_edits, seed=config.seed), taus=config.taus,
                             progress=False)
    table1_exp.write(evaluation, out)
    results["evaluate"] = evaluation
    done("table 1 + figure 7", start)

    start = stage("bounds")
    results["bounds"] = bounds_lib.run(model, facts, layer, cov, corpora.ContextSource(source), corpus=source,
                                       config=bounds_lib.BoundsConfig(n=config.bounds_edits, seed=config.seed),
                                       progress=False)
    bounds_exp.write(results["bounds"], out)
    done("bounds", start)

    start = stage("report")
    write_text(out / REPORT, report(out, {"seconds": seconds, "layer": layer, "config": asdict(config)}))
    done("report", start)
    bar.close()
    return {"results": results, "seconds": seconds, "layer": layer, "config": asdict(config),
            "rep_config": asdict(evaluation.rep_config), "report": str(out / REPORT)}


if __name__ == "__main__":  # python -m keyscope.studies.reproduce figures: REPORT.md again from the artefacts
    import json
    import sys

    figures_dir = Path(sys.argv[1])
    run_record = json.loads((figures_dir / "reproduce_timings.json").read_text())
    write_text(figures_dir / REPORT, report(figures_dir, run_record))
