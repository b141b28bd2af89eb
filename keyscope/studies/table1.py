"""Table 1 and Figure 7: ROME and ROME+REP on Success, Locality and the Rephrase/Shuffle/Long probes,
in-domain and out-of-domain, and ROME+REP against the gate threshold τ.

``run`` calls :func:`keyscope.evaluation.evaluate.evaluate` and writes ``table1.csv`` (one row per method: every metric,
its 95% interval and the ``P(new) > P(true)`` rate), ``table1.md`` (the table as in the paper, in percent
with intervals) and ``table1_facts.csv`` (per fact and method: hits and totals; for a gated method also the
gate diagnostics' counts of its Locality prompts, :data:`GATE_COLUMNS`); with a τ sweep also
``fig7_tau_sweep.png`` and ``fig7_tau_sweep.csv``.
"""

from __future__ import annotations

from pathlib import Path

from keyscope._infra.atomic import save_figure, write_text
from keyscope.data.perturbations import KINDS, LONG, REPHRASE, SHUFFLE, SHUFFLE_WORDS
from keyscope.evaluation import evaluate as ev
from keyscope.evaluation.metrics import DOMAINS, METRICS
from keyscope.studies.plotting import fig7
from keyscope.studies.tables import percent, write_csv

#: The gate diagnostics of the per-fact CSV (gated methods): ``gate_locality_<count>``, the fact's
#: :func:`keyscope.evaluation.evaluate.gate_counts` (its Locality prompts and failures are ``locality_total``/``_hits``).
GATE_COLUMNS = ("on", "own", "other", "failed_on", "failed_own", "failed_other", "adaptors_failed", "adaptors_kept",
                "positions_failed", "positions_kept")

TABLE_CSV = "table1.csv"
TABLE_MD = "table1.md"
FACTS_CSV = "table1_facts.csv"
FIGURE = "fig7_tau_sweep.png"
SWEEP_CSV = "fig7_tau_sweep.csv"

#: What the paper reports for ROME+REP minus ROME on LLaMA-2-7B, in points (Yan et al., Table 1, as quoted in
#: keyscope's issues #5 and #13): in-domain Rephrase +27, Shuffle +63.9, Long +4, out-of-domain +16.1 / +37.7 /
#: +5.3; Success −3.5, Locality −4.8.
PAPER_DELTAS = {"success": -3.5, "locality": -4.8, "rephrase_id": 27.0, "shuffle_id": 63.9, "long_id": 4.0,
                "rephrase_ood": 16.1, "shuffle_ood": 37.7, "long_ood": 5.3}

_KIND_HEADERS = {REPHRASE: "Rephrase", SHUFFLE: "Shuffle", SHUFFLE_WORDS: "Word shuffle", LONG: "Long"}
_DOMAIN_HEADERS = {"id": "ID", "ood": "OOD", "ood_new": "OOD new"}
HEADERS = {"success": "Success", "locality": "Locality",
           **{f"{kind}_{domain}": f"{_KIND_HEADERS[kind]} {_DOMAIN_HEADERS[domain]}"
              for kind in KINDS for domain in DOMAINS}}


def metric_rows(summary: dict, names) -> list[str]:
    """Markdown rows ``| name | metric [lo, hi] | …`` of every Table 1 column, in percent with the 95% interval."""
    lines = ["| method | " + " | ".join(HEADERS[m] for m in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name in names:
        s = summary[name]
        cells = [percent(s[m]) + ("" if s["ci"][m] is None else f" [{percent(s['ci'][m][0])}, {percent(s['ci'][m][1])}]")
                 for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def text_rows(summary: dict, names) -> list[str]:
    """Every Table 1 column for ``names`` as aligned text, in percent."""
    width = max(len(n) for n in names) + 2
    columns = {m: max(len(HEADERS[m]), 6) + 2 for m in METRICS}
    lines = ["method".ljust(width) + "".join(HEADERS[m].rjust(columns[m]) for m in METRICS)]
    for name in names:
        lines.append(name.ljust(width) + "".join(percent(summary[name][m]).rjust(columns[m]) for m in METRICS))
    return lines


def markdown(result: ev.EvalResult, methods=ev.METHODS) -> str:
    """Table 1 as markdown: percent, with the 95% interval under each number."""
    names = [m for m in methods if m in result.summary]
    return summary_markdown(result.summary, names, len(result.rows), result.model, result.layer)


def summary_markdown(summary: dict, names, n_edits: int, model: str, layer: int) -> str:
    """:func:`markdown` of a summary (:func:`keyscope.evaluation.evaluate.summarize`'s form, e.g. read back from
    ``table1.csv``) over ``n_edits`` edits."""
    lines = metric_rows(summary, names)
    n_prompts = summary[names[0]]["counts"]
    lines.append("")
    lines.append(f"{n_edits} edits of known facts, {model}, layer {layer}; micro-averaged "
                 "top-1 rates in percent with 95% cluster-bootstrap intervals; prompts per column: "
                 + ", ".join(f"{HEADERS[m]} {n_prompts[m]}" for m in METRICS) + ".")
    return "\n".join(lines) + "\n"


def format_table(result: ev.EvalResult, methods=ev.METHODS, timings: bool = True) -> str:
    """Table 1 as aligned text for the terminal (``timings=False``: without the seconds, as a notebook shows it)."""
    names = [m for m in methods if m in result.summary]
    lines = text_rows(result.summary, names)
    lines.append(f"{len(result.rows)} edits ({result.n_known} known facts)"
                 + (f", {result.seconds:.0f} s" if timings else ""))
    return "\n".join(lines)


def write(result: ev.EvalResult, out_dir: str | Path, methods=ev.METHODS) -> list[Path]:
    """Write the table (CSV, markdown), the per-fact CSV and, with a sweep, Figure 7 into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table_rows = []
    for method in [m for m in methods if m in result.summary]:
        s = result.summary[method]
        row = {"method": method}
        for metric in METRICS:
            ci = s["ci"][metric] or (None, None)
            row.update({metric: s[metric], f"{metric}_lo": ci[0], f"{metric}_hi": ci[1],
                        f"{metric}_prompts": s["counts"][metric]})
            if metric in s["prob"]:
                row[f"{metric}_p_new_gt_true"] = s["prob"][metric]
        table_rows.append(row)
    files = [out / TABLE_CSV, out / TABLE_MD, out / FACTS_CSV]
    write_csv(files[0], table_rows)
    write_text(files[1], markdown(result, methods))
    fact_rows = []
    for r in result.rows:
        for method, scores in r["methods"].items():
            row = {"case_id": r["case_id"], "method": method}
            for metric in METRICS:
                row[f"{metric}_hits"], row[f"{metric}_total"] = scores[metric][0], scores[metric][1]
            gates = r.get("gates", {}).get(method)
            if gates is not None:
                row.update({f"gate_locality_{k}": gates[k] for k in GATE_COLUMNS})
            fact_rows.append(row)
    write_csv(files[2], fact_rows)
    return files + write_sweep(result, out)


def sweep_figure(result: ev.EvalResult):
    """Figure 7 (:func:`keyscope.studies.plotting.fig7.tau_sweep`) of ``result``'s τ sweep, or ``None`` without one."""
    sweep = result.tau_sweep()
    if not sweep:
        return None
    taus = sorted(sweep)
    shown = [m for m in METRICS if not m.endswith("_ood_new")]
    return fig7.tau_sweep(taus, {m: [sweep[t][m] for t in taus] for m in shown},
                          baseline=result.summary.get("rome"), labels=HEADERS,
                          title=f"{result.model}, layer {result.layer}, {len(result.rows)} edits: ROME+REP "
                                "against τ (dotted: ROME)")


def write_sweep(result: ev.EvalResult, out_dir: str | Path) -> list[Path]:
    """Figure 7 and its CSV, if ``result`` has a τ sweep (nothing otherwise)."""
    out = Path(out_dir)
    sweep = result.tau_sweep()
    if not sweep:
        return []
    out.mkdir(parents=True, exist_ok=True)
    taus = sorted(sweep)
    save_figure(sweep_figure(result), out / FIGURE, dpi=150)
    write_csv(out / SWEEP_CSV, [{"tau": t, **sweep[t]} for t in taus])
    return [out / FIGURE, out / SWEEP_CSV]
