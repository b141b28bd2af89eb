"""The numbers of the README, the docs and REPORT against the artefacts committed in figures/."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from keyscope.studies import readme, reproduce

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REPORT = FIGURES / "REPORT.md"

#: The results every version of the README showed; each must still be rendered somewhere in README.md or docs/.
REQUIRED = {"similarity", "scan", "values", "table1", "tau_sweep", "bounds", "build", "trace", "ablation",
            "timing", "smollm2_known", "smollm2_bos", "smollm2_edit", "smollm2_similarity", "smollm2_trace",
            "smollm2_table1", "smollm2_bench", "smollm2_schemas", "smollm2_scan", "smollm2_values", "smollm2_tau_sweep",
            "smollm2_bounds", "smollm2_reach", "smollm2_memit", "shape", "paper", "reach", "sequential", "memit_bounds"}


def _pages() -> list[Path]:
    """README.md and every markdown page under docs/, as ``python -m keyscope.studies.readme README.md docs
    figures`` reads them."""
    return readme.markdown_files([README, DOCS])


def _occurrences() -> list[tuple[str, str, str]]:
    """``(file, name, body)`` of every block of the README and the docs."""
    return [(path.relative_to(ROOT).as_posix(), m["name"], m["body"])
            for path in _pages() for m in readme.BLOCK.finditer(path.read_text())]


def test_every_result_is_rendered_somewhere_and_every_name_is_known():
    names = [name for _, name, _ in _occurrences()]
    assert REQUIRED <= set(readme.BLOCKS), "a required block has no renderer"
    assert set(readme.BLOCKS) <= set(names), f"blocks rendered nowhere: {sorted(set(readme.BLOCKS) - set(names))}"
    assert set(names) <= set(readme.BLOCKS), f"blocks without a renderer: {sorted(set(names) - set(readme.BLOCKS))}"


@pytest.mark.parametrize(("page", "name", "body"), _occurrences(), ids=[f"{f}:{n}" for f, n, _ in _occurrences()])
def test_block_is_rendered_from_its_artefacts(page, name, body):
    assert body == readme.render(name, FIGURES), f"block {name!r} of {page} differs from its artefacts"


def test_pages_hold_no_unclosed_or_misspelt_block():
    for path in _pages():
        text = path.read_text()
        opened = re.findall(r"<!-- keyscope:([a-z0-9_]+) -->", text)
        closed = re.findall(r"<!-- /keyscope:([a-z0-9_]+) -->", text)
        assert sorted(opened) == sorted(closed) == sorted(readme.blocks(text)), path


def test_renderer_rewrites_files_and_folders_and_names_missing_artefacts(tmp_path, capsys):
    figures = tmp_path / "figures"
    figures.mkdir()
    shutil.copy(FIGURES / "factworld_build_seed0.json", figures)
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    page = tmp_path / "docs" / "sub" / "page.md"
    page.write_text("a\n<!-- keyscope:trace -->\nstale\n<!-- /keyscope:trace -->\n"
                    "<!-- keyscope:values -->\nkept\n<!-- /keyscope:values -->\n")
    top = tmp_path / "README.md"
    top.write_text("<!-- keyscope:trace -->\n<!-- /keyscope:trace -->\n")
    assert readme.main([str(top), str(tmp_path / "docs"), str(figures)]) == 1  # values' artefact is missing
    assert readme.blocks(top.read_text())["trace"] == readme.render("trace", FIGURES)
    blocks = readme.blocks(page.read_text())
    assert blocks["trace"] == readme.render("trace", FIGURES) and blocks["values"] == "kept\n"
    assert "page.md: not rendered, artefacts missing: values" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        readme.update(page.read_text(), figures)


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
    from keyscope.evaluation.metrics import METRICS
    from keyscope.studies.table1 import HEADERS

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


def _timings() -> dict:
    return json.loads((FIGURES / "reproduce_timings.json").read_text())


def test_report_is_rendered_from_its_artefacts():
    """Every number of REPORT.md (trace, Figures 3–5 and 7, Table 1 and its deltas against the paper, the lemma
    block, the stage times) is what reproduce's renderer reads from the committed artefacts."""
    assert REPORT.read_text() == reproduce.report(FIGURES, _timings())


def test_report_holds_what_the_run_wrote_beside_it():
    # table1.md and bounds.md were written from the run's in-memory results: the report, rendered from the CSVs,
    # holds them verbatim
    text = REPORT.read_text()
    assert (FIGURES / "table1.md").read_text().rstrip() in text
    assert (FIGURES / "bounds.md").read_text() in text


def test_report_trace_deltas_sweep_and_times_match_their_artefacts():
    from keyscope.evaluation.metrics import METRICS
    from keyscope.studies.table1 import HEADERS, PAPER_DELTAS

    text = REPORT.read_text()
    trace = _csv("trace.csv")
    table = _table_after(text, "## Causal trace")
    for row, kind in ((table[1], "mlp"), (table[2], "attn")):
        for layer, cell in enumerate(row[1:]):
            assert float(cell) == pytest.approx(np.mean([float(r[f"{kind}_{layer}"]) for r in trace]), abs=6e-4)
    total = np.mean([float(r["p_clean"]) - float(r["p_corrupted"]) for r in trace])
    assert f"total effect of the corruption {total:.3f}" in text and f"{len(trace)} known facts" in text

    by_method = {row["method"]: row for row in _csv("table1.csv")}
    deltas = _table_after(text, "ROME+REP minus ROME")
    titles = {HEADERS[m]: m for m in METRICS}
    assert {row[0] for row in deltas[1:]} == set(titles)
    real = {row["method"]: row for row in _csv("smollm2/table1/table1.csv")}
    assert deltas[0] == ["metric", "keyscope on factworld", "keyscope on smollm2-135m", "paper"]
    for title, ours, smollm2, paper in deltas[1:]:
        metric = titles[title]
        for cell, rows in ((ours, by_method), (smollm2, real)):
            assert float(cell) == pytest.approx(
                100 * (float(rows["rome+rep"][metric]) - float(rows["rome"][metric])), abs=0.051), title
        assert (float(paper) if paper else None) == PAPER_DELTAS.get(metric), title

    sweep = {float(r["tau"]): r for r in _csv("fig7_tau_sweep.csv")}
    table = _table_after(text, "## Figure 7")
    assert len(table) - 1 == len(sweep)
    for row in table[1:]:
        for title, cell in zip(table[0][1:], row[1:]):
            assert float(cell.rstrip("%")) == pytest.approx(100 * float(sweep[float(row[0])][titles[title]]), abs=0.051)

    times = re.search(r"Stage times: (.*)\.\n", text).group(1)
    shown = dict(part.rsplit(" ", 2)[:2] for part in times.split(", "))
    assert {k: float(v) for k, v in shown.items()} == pytest.approx(
        {k: v for k, v in _timings()["seconds"].items() if k != "report"}, abs=0.51)


def test_report_renderer_follows_its_artefacts(tmp_path):
    for path in FIGURES.iterdir():
        if path.suffix in (".csv", ".json", ".md"):
            shutil.copy(path, tmp_path / path.name)
    rows = _csv("trace.csv")
    for row in rows:  # no indirect effect at layer 1: the trace now picks layer 2, not the edited layer
        row["mlp_1"] = "0.0"
    _write(tmp_path / "trace.csv", rows)
    sweep = _csv("fig7_tau_sweep.csv")
    sweep[0]["locality"] = "0.5"
    _write(tmp_path / "fig7_tau_sweep.csv", sweep)
    text = reproduce.report(tmp_path, _timings())
    assert "| MLP | 0.067 | 0.000 | 0.100 |" in text and "largest MLP effect is at layer 2" in text
    assert "**not** the layer this trace picks" in text
    assert f"| 0.5 | {100 * float(sweep[0]['success']):.1f}% | 50.0% |" in text  # the changed cell, not the artefact's
    (tmp_path / "fig4_rephrase.csv").unlink()  # without its artefact the rephrase comparison is left out
    assert "for the same subjects' rephrased forms" in text
    assert "for the same subjects' rephrased forms" not in reproduce.report(tmp_path, _timings())


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
