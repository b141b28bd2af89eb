"""The lemma report: run :func:`keyscope.evaluation.bounds.run` and write ``fig_bounds.png``, ``bounds_edits.csv``
(Lemma 4.4 per edit), ``bounds_queries.csv`` (α and measured changes per query) and ``bounds.md``."""

from __future__ import annotations

from pathlib import Path

from keyscope._infra.atomic import save_figure, write_text
from keyscope.evaluation import bounds
from keyscope.studies.plotting import bounds as plot
from keyscope.studies.tables import write_csv

FIGURE = "fig_bounds.png"
EDITS_CSV = "bounds_edits.csv"
QUERIES_CSV = "bounds_queries.csv"
REPORT = "bounds.md"


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def _lemma_4_4_lines(l44: dict, indent: str = "  ") -> list[str]:
    return [
        f"{indent}largest single-head gain (attention weight 1) >= ε1 + ε2: {_fmt(l44['holds_fraction'], True)} of edits",
        f"{indent}... with the heads' actual attention weights:             {_fmt(l44['attention_weighted_holds_fraction'], True)}",
        f"{indent}||Δv|| >= (ε1 + ε2) / max_h ||m_h|| (Cauchy–Schwarz):     {_fmt(l44['norm_bound_holds_fraction'], True)} "
        f"(median bound {_fmt(l44['median_norm_bound'])}, median ||Δv|| {_fmt(l44['median_delta_v_norm'])})",
    ]


def title(result: bounds.BoundsResult) -> str:
    """``"model, layer L: N ROME edits"``, or when other methods than ROME's family ran
    ``"model: N facts edited by m1, m2 (layers: m1 1,2,3; corpus scan at layer L)"``."""
    methods = list(result.summary["lemma_4_6"]["methods"])
    if bounds.edit_methods(methods) == ("rome",):
        return f"{result.model}, layer {result.layer}: {result.n_edited} ROME edits"
    layers = "; ".join(f"{m} {','.join(map(str, ls))}" for m, ls in result.edit_layers.items())
    return (f"{result.model}: {result.n_edited} facts edited by {', '.join(methods)} (layers: {layers}; "
            f"corpus scan at layer {result.layer})")


def format_summary(result: bounds.BoundsResult) -> str:
    """The lemma summary as text (also the body of ``bounds.md``)."""
    s = result.summary
    l44 = s["lemma_4_4"]
    by_method = l44.get("methods") or {}
    lines = [title(result), "Lemma 4.4 (a single attention path must carry ε1 + ε2):"]
    if len(by_method) > 1:
        for method, m in by_method.items():
            lines += [f"  {method}:", *_lemma_4_4_lines(m, "    ")]
    else:
        lines += _lemma_4_4_lines(l44)
    lines.append("Lemma 4.6 (robustness): AUROC of α at the subject's last token for a query's success")
    for method, m in s["lemma_4_6"]["methods"].items():
        lines.append(f"  {method:9s} {_fmt(m['auroc'])} over {m['n_queries']} queries ({m['positives']} successes); "
                     f"α_max over positions {_fmt(m['auroc_alpha_max'])}; Pearson(α, logit-gap change) "
                     f"{_fmt(m['pearson_logit_gap'])}")
    lines.append("  consistency check, not evidence: Pearson(α·Δv*, hooked value change) "
                 + ", ".join(f"{method} {_fmt(m['value_check_pearson'])}" for method, m in s["lemma_4_6"]["methods"].items())
                 + " (1 for ROME by construction"
                 + ("; not for a multi-layer edit, whose earlier layers move the later layers' keys)"
                    if bounds.edit_methods(list(s["lemma_4_6"]["methods"])) != ("rome",) else ")"))
    lines.append("Lemma 4.7 (specificity): AUROC of α for a flipped top-1, per group")
    for method, m in s["lemma_4_7"]["methods"].items():
        for group in bounds.SPECIFICITY_KINDS:
            g = m[group]
            lines.append(f"  {method:9s} {group:13s} {_fmt(g['auroc'])} over {g['n_queries']} prompts "
                         f"({g['positives']} flips), Pearson(α, drop of own log-prob) {_fmt(g['pearson'])}")
        lines.append(f"  {method:9s} {'pooled':13s} {_fmt(m['auroc'])} over {m['n_queries']} prompts "
                     f"({m['positives']} flips)")
    return "\n".join(lines)


def figure(result: bounds.BoundsResult):
    """``fig_bounds.png``'s figure (:func:`keyscope.studies.plotting.bounds.alpha_scatter`)."""
    from keyscope.editing.base import EDITORS

    methods = {r["method"] for r in result.query_rows}
    return plot.alpha_scatter(result.query_rows, title=title(result), bases={m: EDITORS[m].base for m in methods})


def write(result: bounds.BoundsResult, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / FIGURE, out / REPORT]
    save_figure(figure(result), files[0], dpi=150)
    write_text(files[1], "```\n" + format_summary(result) + "\n```\n")
    if result.lemma_4_4_rows:
        write_csv(out / EDITS_CSV, result.lemma_4_4_rows)
        files.append(out / EDITS_CSV)
    if result.query_rows:
        write_csv(out / QUERIES_CSV, result.query_rows)
        files.append(out / QUERIES_CSV)
    return files
