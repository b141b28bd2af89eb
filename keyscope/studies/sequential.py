"""``keyscope sequential``: ``N`` edits one after another with each method, measured at checkpoints
(:mod:`keyscope.evaluation.sequential`); writes ``fig_sequential.png`` (each metric against the number of edits, one line
per method) and ``sequential.csv`` (one row per method and checkpoint)."""

from __future__ import annotations

from pathlib import Path

from keyscope._infra.atomic import save_figure
from keyscope.evaluation.sequential import CHECKPOINT_METRICS, SequentialResult
from keyscope.studies.plotting.sequential import sequential as sequential_figure
from keyscope.studies.tables import percent, write_csv

FIGURE = "fig_sequential.png"
CSV = "sequential.csv"

LABELS = {"retention": "Retention (Success of earlier edits)", "locality": "Locality (vs unedited)",
          "gate_other": "Gate on another edit's subject"}


def rows(result: SequentialResult) -> list[dict]:
    """One row per method and checkpoint: ``method``, ``n_edits``, every metric, the seconds."""
    return [{"method": method, **entry} for method, entries in result.methods.items() for entry in entries]


def write(result: SequentialResult, out_dir: str | Path) -> list[Path]:
    """Write the figure and the CSV into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in CHECKPOINT_METRICS
               if any(e.get(m) is not None for entries in result.methods.values() for e in entries)]
    curves = {m: {method: [(e["n_edits"], e.get(m)) for e in entries] for method, entries in result.methods.items()}
              for m in metrics}
    figure = sequential_figure(curves, LABELS, title=f"Sequential editing on {result.model} (layer {result.layer})")
    return [save_figure(figure, out / FIGURE, dpi=130), write_csv(out / CSV, rows(result))]


def format_table(result: SequentialResult) -> str:
    """The checkpoints as aligned text: method, edits, retention, locality, the in-domain rates, gate."""
    columns = ["retention", "locality", "rephrase_id", "shuffle_id", "long_id", "gate_other"]
    lines = ["method".ljust(12) + "edits".rjust(6) + "".join(c.rjust(12) for c in columns) + "seconds".rjust(10)]
    for method, entries in result.methods.items():
        for e in entries:
            lines.append(method.ljust(12) + str(e["n_edits"]).rjust(6)
                         + "".join(percent(e.get(c)).rjust(12) for c in columns) + f"{e['seconds']:10.0f}")
    return "\n".join(lines)
