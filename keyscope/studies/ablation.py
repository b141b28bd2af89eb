"""What each departure buys: ``keyscope evaluate --ablate`` (:func:`keyscope.evaluation.ablation.ablate`).

``write`` puts ``ablation.md`` (one row per variant and ROME baseline: every Table 1 column in percent with its 95%
interval, and what the variant reverts; then each variant minus keyscope's setting, in points, with its paired 95%
interval) and ``ablation.csv`` (the same numbers, with the prompt counts; the differences as rates in
``METRIC_diff``, ``METRIC_diff_lo``, ``METRIC_diff_hi``, empty for keyscope and the baselines) into ``out_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keyscope._infra.atomic import write_text
from keyscope._infra.distributed import SINGLE, ProcessRank
from keyscope.evaluation import ablation
from keyscope.evaluation.evaluate import EvalConfig
from keyscope.evaluation.metrics import METRICS
from keyscope.studies.table1 import HEADERS, metric_rows, text_rows
from keyscope.studies.tables import write_csv

TABLE_MD = "ablation.md"
TABLE_CSV = "ablation.csv"


def _rows(result: ablation.AblationResult) -> list[tuple[str, str]]:
    """``(name, what it is)`` of every row: the ROME baselines, then the variants."""
    return ([(name, "ROME alone") for name in result.baselines]
            + [(v.name, v.departure) for v in result.variants])


def markdown(result: ablation.AblationResult) -> str:
    """The ablation as markdown: percent with the 95% interval beside each number."""
    lines = metric_rows(result.summary, [name for name, _ in _rows(result)])
    lines[0] = lines[0].replace("| method |", "| variant |", 1)
    lines += ["", f"{len(result.rows)} edits of known facts, {result.model}, layer {result.layer}; micro-averaged top-1 "
              "rates in percent with 95% cluster-bootstrap intervals. Each variant reverts one of keyscope's "
              "departures to the released code's choice or, for a row marked 'tried', switches a choice keyscope "
              "dropped for the released one back on:", ""]
    lines += [f"- **{name}**: {what}" for name, what in _rows(result)]
    lines += _difference_rows(result)
    return "\n".join(lines) + "\n"


def _signed(value: float | None) -> str:
    """A rate's difference in points, signed (no "-0.0")."""
    return "n/a" if value is None else f"{round(100 * value, 1) or 0.0:+.1f}"


def _difference_rows(result: ablation.AblationResult) -> list[str]:
    """The markdown table of each variant minus keyscope's setting, in points with the paired 95% interval."""
    names = [v.name for v in result.variants if "difference" in result.summary[v.name]]
    if not names:
        return []
    lines = ["", f"Each variant minus `{ablation.BASE}`, in points, with the paired 95% cluster-bootstrap interval of "
             "the difference (the same resampled facts for both; an interval that excludes 0 is a measured effect):",
             "", "| variant | " + " | ".join(HEADERS[m] for m in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name in names:
        s = result.summary[name]
        cells = [_signed(s["difference"][m]) + ("" if s["difference_ci"][m] is None else
                                                f" [{_signed(s['difference_ci'][m][0])}, {_signed(s['difference_ci'][m][1])}]")
                 for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def format_table(result: ablation.AblationResult) -> str:
    """The ablation as aligned text for the terminal."""
    lines = text_rows(result.summary, [name for name, _ in _rows(result)])
    lines.append(f"{len(result.rows)} edits ({result.n_known} known facts), {result.seconds:.0f} s")
    return "\n".join(lines)


@dataclass(frozen=True)
class AblationConfig:
    """What the ablation scores: the edited ``layer``, the facts and probes of each (``evaluation``, a
    :class:`~keyscope.evaluation.evaluate.EvalConfig`), and, if given, the gate threshold ``tau`` and adaptor
    ``seed`` that replace every variant's own. No I/O."""

    layer: int
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    tau: float | None = None
    seed: int | None = None


def run(model, facts, config: AblationConfig, *, cov, context_docs, corpus=None, out_dir: str | Path | None = None,
        progress: bool = True, world: ProcessRank = SINGLE, checkpoint=None) -> tuple[ablation.AblationResult, list[Path]]:
    """:func:`keyscope.evaluation.ablation.ablate` over :data:`keyscope.evaluation.ablation.VARIANTS` (with its ``checkpoint``, if any),
    written into ``out_dir`` (nothing written for ``None``, nor by ranks other than 0 of a ``torchrun`` ``world``)."""
    result = ablation.ablate(model, facts, config.layer, cov, context_docs, corpus=corpus, config=config.evaluation,
                             tau=config.tau, seed=config.seed, progress=progress, world=world, checkpoint=checkpoint)
    return result, ([] if out_dir is None or not world.is_main else write(result, out_dir))


def write(result: ablation.AblationResult, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, what in _rows(result):
        s = result.summary[name]
        row = {"variant": name, "departure": what}
        for metric in METRICS:
            ci = s["ci"][metric] or (None, None)
            row.update({metric: s[metric], f"{metric}_lo": ci[0], f"{metric}_hi": ci[1],
                        f"{metric}_prompts": s["counts"][metric]})
        for metric in METRICS:
            diff, diff_ci = s.get("difference", {}).get(metric), (s.get("difference_ci", {}).get(metric) or (None, None))
            row.update({f"{metric}_diff": diff, f"{metric}_diff_lo": diff_ci[0], f"{metric}_diff_hi": diff_ci[1]})
        rows.append(row)
    write_csv(out / TABLE_CSV, rows)
    write_text(out / TABLE_MD, markdown(result))
    return [out / TABLE_MD, out / TABLE_CSV]
