"""The README's and REPORT's numbers against the artefacts committed in figures/."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from keyscope.experiments import readme

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
README = ROOT / "README.md"
REPORT = FIGURES / "REPORT.md"


def test_every_readme_block_is_rendered_from_its_artefacts():
    found = readme.blocks(README.read_text())
    assert {"similarity", "scan", "values", "table1", "tau_sweep", "bounds", "build", "trace", "ablation",
            "timing"} <= set(found)
    for name, body in found.items():
        assert body == readme.render(name, FIGURES), f"README block {name!r} differs from its artefacts"


def test_update_rewrites_a_stale_block_and_keeps_the_rest():
    text = "intro 0.5\n<!-- keyscope:trace -->\nstale 0.123\n<!-- /keyscope:trace -->\noutro\n"
    updated = readme.update(text, FIGURES)
    assert updated.startswith("intro 0.5\n") and updated.endswith("outro\n") and "stale" not in updated
    assert readme.blocks(updated)["trace"] == readme.render("trace", FIGURES)


def _table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after ``heading``."""
    section = text[text.index(heading):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return [r for r in rows if not set("".join(r)) <= set("-:")]


def _csv(name: str) -> list[dict]:
    with (FIGURES / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_figure3_table_matches_its_csv():
    values: dict[str, list[float]] = {}
    for row in _csv("fig3_similarity.csv"):
        values.setdefault(row["kind"], []).append(float(row["similarity"]))
    table = _table_after(REPORT.read_text(), "## Figure 3")
    assert table[0][:5] == ["perturbation", "n", "median", "q10", "q90"]
    assert {row[0] for row in table[1:]} == set(values)
    for kind, n, median, q10, q90, *_ in table[1:]:
        v = np.asarray(values[kind])
        assert int(n) == len(v)
        for shown, actual in ((median, np.median(v)), (q10, np.quantile(v, 0.1)), (q90, np.quantile(v, 0.9))):
            assert float(shown) == pytest.approx(actual, abs=6e-4), kind


def test_report_table1_matches_its_csv():
    from keyscope.experiments.table1 import HEADERS
    from keyscope.metrics import METRICS

    by_method = {row["method"]: row for row in _csv("table1.csv")}
    text = REPORT.read_text()
    table = _table_after(text, "## Table 1")
    header = table[0]
    columns = {HEADERS[m]: m for m in METRICS}
    checked = 0
    for row in table[1:]:
        method = row[0]
        if method not in by_method:
            continue
        for title, cell in zip(header[1:], row[1:]):
            number = re.match(r"[-−]?\d+(\.\d+)?", cell)
            if title in columns and number:
                assert float(number.group(0).replace("−", "-")) == pytest.approx(
                    100 * float(by_method[method][columns[title]]), abs=0.051), (method, title)
                checked += 1
    assert checked >= 2 * len(METRICS)
