"""Causal tracing as an experiment: the profile of where a model recalls its facts, and the layer to edit.

``run`` traces ``config.n`` known facts (:func:`keyscope.analysis.trace.trace_facts`), traces one fact at every token ×
layer (:func:`keyscope.analysis.trace.heatmap`), and writes ``trace.png`` (:func:`keyscope.studies.plotting.trace.causal_trace`)
and ``trace.csv`` (one row per fact: clean and corrupted probabilities, the indirect effect of every layer's
MLP and attention output at the subject's last token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keyscope._infra.atomic import save_figure
from keyscope._infra.errors import KeyscopeError
from keyscope.analysis import trace
from keyscope.studies.plotting.trace import causal_trace
from keyscope.studies.tables import write_csv

FIGURE = "trace.png"
TABLE = "trace.csv"


@dataclass
class TraceReport:
    result: trace.TraceResult = field(repr=False)
    heatmap: trace.Heatmap | None = field(default=None, repr=False)
    files: list[Path] = field(default_factory=list)
    figure: object = field(default=None, repr=False)

    def as_json(self) -> dict:
        out = self.result.as_json()
        if self.heatmap is not None:
            out["heatmap"] = {"case_id": self.heatmap.case_id, "tokens": list(self.heatmap.tokens),
                              "subject": list(self.heatmap.subject),
                              **{kind: values.round(6).tolist() for kind, values in self.heatmap.effects.items()}}
        out["files"] = [str(p) for p in self.files]
        return out


def find_case(facts, case):
    """The fact with case id ``case`` (compared as text), or a one-line error."""
    chosen = next((f for f in facts if str(f.case_id) == str(case)), None)
    if chosen is None:
        raise KeyscopeError(f"no fact with case id {case!r} to trace")
    return chosen


def run(model, facts, config: trace.TraceConfig, *, out_dir: str | Path | None = None, case=None,
        progress: bool = True) -> TraceReport:
    """Trace ``facts`` (module docstring); the heat map shows fact ``case`` (a case id; default: the first
    traced fact). With ``out_dir=None`` nothing is written."""
    chosen = None if case is None else find_case(facts, case)
    result = trace.trace_facts(model, facts, config, progress=progress)
    if chosen is None:
        chosen = find_case(facts, result.facts[0].case_id)
    heat = trace.heatmap(model, chosen, config, sigma=result.sigma)
    report = TraceReport(result, heat)
    if out_dir is None:
        return report
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = causal_trace(result.indirect_effect, result.layer, heat.effects, heat.tokens, heat.subject,
                          title=f"{result.model}: causal trace over {len(result.facts)} known facts")
    save_figure(figure, out / FIGURE, dpi=150)
    rows = [{"case_id": f.case_id, "p_clean": f.p_clean, "p_corrupted": f.p_corrupted,
             **{f"mlp_{layer}": v for layer, v in enumerate(f.mlp)}, **{f"attn_{layer}": v for layer, v in enumerate(f.attn)}}
            for f in result.facts]
    write_csv(out / TABLE, rows)
    report.files, report.figure = [out / FIGURE, out / TABLE], figure
    return report


def format_summary(report: TraceReport) -> str:
    """The per-layer average indirect effects as text, with the chosen layer."""
    result = report.result
    effects = result.indirect_effect
    lines = [f"{result.model}: causal trace of {len(result.facts)} known facts ({result.n_known} known), noise "
             f"sigma {result.sigma:.3g} ({result.config.noise_scale:g} x embedding std), {result.config.samples} draws each",
             f"clean P(answer) {report.as_json()['p_clean']:.3f}, corrupted {report.as_json()['p_corrupted']:.3f}",
             f"{'layer':>5}  {'MLP IE':>8}  {'attn IE':>8}"]
    for layer in range(result.n_layers):
        mark = "  <- edit layer" if layer == result.layer else ""
        lines.append(f"{layer:>5}  {effects['mlp'][layer]:>8.4f}  {effects['attn'][layer]:>8.4f}{mark}")
    return "\n".join(lines)
