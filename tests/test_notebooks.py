"""Every notebook in notebooks/ runs, and the outputs committed with it are current.

The notebooks are committed with the outputs of quick mode (``KEYSCOPE_QUICK=1``: small sizes, small PNGs), made
by ``python -m keyscope.studies.notebooks`` (:mod:`keyscope.studies.notebooks`). Each test executes one notebook
afresh the same way (one thread, files into a temporary folder, never figures/) and compares its outputs with the
committed ones: every text output exactly, but for numbers one unit of their last printed digit apart (seeded runs,
rounded the other way on another CPU), and that the same outputs carry
an image. The images' bytes are not compared: matplotlib versions and fonts draw the same figure with different
pixels. On a failure, run ``python -m keyscope.studies.notebooks NAME`` and commit the notebook.
"""

from __future__ import annotations

import pytest

from keyscope.studies import notebooks

NOTEBOOKS = notebooks.notebooks()


def test_every_notebook_is_committed_with_its_outputs_and_no_volatile_metadata():
    nbformat = pytest.importorskip("nbformat")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert 'QUICK = os.environ.get("KEYSCOPE_QUICK") == "1"' in code[0].source, path.name
        assert "KEYSCOPE_QUICK" in nb.cells[0].source and "figures/" in nb.cells[0].source, path.name
        assert all(c.execution_count == i for i, c in enumerate(code, 1)), f"{path.name}: run it in order"
        assert nb.metadata == notebooks.METADATA, path.name
        assert not any(c.metadata for c in nb.cells), f"{path.name}: cell metadata (timings)"
        text = nbformat.writes(notebooks.normalise(nbformat.read(path, as_version=4)))
        assert text.rstrip("\n") == path.read_text().rstrip("\n"), \
            f"{path.name} is not normalised: python -m keyscope.studies.notebooks {path.name}"
        figures = [c for c in code if "show(" in c.source]
        assert all(any("image/png" in o.get("data", {}) for o in c.outputs) for c in figures), path.name
        assert "IPython.display import Image" not in "".join(c.source for c in code), "one way to show a figure: show()"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_its_committed_outputs_are_current(path):
    pytest.importorskip("nbclient")
    problems = notebooks.stale(path)
    assert not problems, f"{path.name}: " + "; ".join(problems) + f" (python -m keyscope.studies.notebooks {path.name})"


def test_outputs_may_differ_only_in_the_last_printed_digit():
    same = notebooks.same_but_last_digits
    assert same("median 0.281 of 10", "median 0.282 of 10") and same("x 12 y", "x 12 y")
    assert not same("median 0.281", "median 0.283")  # two units of the last digit
    assert not same("median 0.281 of 10", "median 0.281 of 11")  # an integer is a count: one unit is one unit
    assert not same("success 0.9", "locality 0.9")  # the words must match
