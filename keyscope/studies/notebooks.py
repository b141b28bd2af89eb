"""The notebooks of ``notebooks/``: executed in quick mode, committed with their outputs, checked to be current.

Each notebook is a thin shell over a study (:mod:`keyscope.studies`): a first code cell with its sizes and
``QUICK = os.environ.get("KEYSCOPE_QUICK") == "1"``, the study's call with its config object, its text, and its
figures shown one way, :func:`keyscope.studies.plotting.show`. The committed outputs are quick mode's (small
sizes, small PNGs); the full-size figures are in ``figures/`` and the docs. ::

    python -m keyscope.studies.notebooks                 # execute every notebook in place, rewrite its outputs
    python -m keyscope.studies.notebooks fig3_key_similarity.ipynb   # one (a name or a path)
    python -m keyscope.studies.notebooks --check         # exit status 1 when committed outputs are not current

A run executes the notebooks one at a time with ``KEYSCOPE_QUICK=1``, ``KEYSCOPE_FIGURES`` a temporary folder
(the files they write never go to ``figures/``), one CPU thread (``OMP_NUM_THREADS=1``, so the numbers do not
depend on the machine's core count) and ``PYTHONPATH`` led by this checkout (the kernel imports this code), then
:func:`normalise` strips what changes from run to run. ``tests/test_notebooks.py`` runs :func:`stale` on each.
Needs ``nbclient``, ``nbformat`` and ``ipykernel`` (``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
#: Seconds one cell may run before the execution fails.
CELL_TIMEOUT = 900
#: The notebooks' metadata, as committed (no Python version, no kernel ids).
METADATA = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}}
#: The mime types of a figure; every other output is text and compared exactly.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")


def notebooks(names=()) -> list[Path]:
    """The notebooks named (file names in ``notebooks/``, with or without ``.ipynb``, or paths), all by default."""
    if not names:
        return sorted(NOTEBOOKS.glob("*.ipynb"))
    found = []
    for name in names:
        path = Path(name)
        if not path.is_file():
            path = NOTEBOOKS / (name if name.endswith(".ipynb") else f"{name}.ipynb")
        if not path.is_file():
            raise SystemExit(f"no notebook {name!r} (the notebooks: {', '.join(p.name for p in notebooks())})")
        found.append(path)
    return found


@contextlib.contextmanager
def _environment(figures: str) -> Iterator[None]:
    """The kernel's environment (it inherits this process's): quick mode, ``figures`` for the files, one thread
    and this checkout first on ``PYTHONPATH``; restored on exit."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    settings = {"KEYSCOPE_QUICK": "1", "KEYSCOPE_FIGURES": figures, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(path: Path, figures: str | Path | None = None, timeout: int = CELL_TIMEOUT):
    """``path`` executed in quick mode (module docstring) from its own folder, normalised (:func:`normalise`);
    the files it writes go into ``figures`` (default: a temporary folder, removed). The file is not changed."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with contextlib.ExitStack() as stack:
        folder = str(figures) if figures is not None else stack.enter_context(tempfile.TemporaryDirectory())
        stack.enter_context(_environment(folder))
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    return normalise(nb)


#: The mime type of a Jupyter widget (tqdm's progress bar in a notebook): a kernel-specific id, never kept.
WIDGET = "application/vnd.jupyter.widget-view+json"


def _merged(outputs: list) -> list:
    """``outputs`` without stderr and widgets (progress bars and warnings: their text depends on timing and on
    what is cached) and with consecutive stdout chunks joined (the kernel flushes them at times of its own)."""
    merged: list = []
    for output in outputs:
        if WIDGET in output.get("data", {}):
            continue
        if output.get("output_type") == "stream":
            if output.get("name") != "stdout":
                continue
            if merged and merged[-1].get("output_type") == "stream":
                merged[-1]["text"] += output["text"]
                continue
        merged.append(output)
    return merged


def normalise(nb):
    """``nb`` with nothing that changes from run to run: the committed metadata (no kernel ids, no Python
    version), no timing in the cells' metadata, no stderr, stdout in one piece per run of text. Execution counts
    stay (a run executes the cells in order, so they are 1, 2, …)."""
    import nbformat

    nb.metadata = nbformat.from_dict(copy.deepcopy(METADATA))
    for cell in nb.cells:
        for key in ("execution", "ExecuteTime", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = _merged(cell.outputs)
            for output in cell.outputs:
                if "metadata" in output:
                    output["metadata"] = {}
    return nb


def signature(nb) -> list[list[tuple]]:
    """What must match between the committed and a fresh run, per code cell: each output's type, its text (stream
    text, every non-image mime type's data) exactly, and which image types it has — not the images' bytes, since
    matplotlib versions (and fonts) draw the same figure with different pixels."""
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            text = {k: v for k, v in data.items() if k not in IMAGE_TYPES}
            outputs.append((output.get("output_type"), output.get("name"), output.get("text"),
                            output.get("execution_count"), sorted(text.items()),
                            sorted(k for k in data if k in IMAGE_TYPES), output.get("ename")))
        cells.append(outputs)
    return cells


_NUMBER = re.compile(r"-?\d+(?:\.(\d+))?(?:[eE][-+]?\d+)?")


def same_but_last_digits(old: str, new: str) -> bool:
    """Whether two printed outputs are the same text with decimal numbers that differ by at most one unit of their
    last printed digit (a seeded run on another CPU may round a float the other way); integers and everything else
    must be equal."""
    if _NUMBER.sub("#", old) != _NUMBER.sub("#", new):
        return False
    for a, b in zip(_NUMBER.finditer(old), _NUMBER.finditer(new)):
        if a.group() == b.group():
            continue
        if "e" in a.group().lower() or "e" in b.group().lower():
            return False
        decimals = max(len(a.group(1) or ""), len(b.group(1) or ""))
        if decimals == 0:  # an integer (a count) is exact
            return False
        if abs(float(a.group()) - float(b.group())) > 1.0001 * 10.0 ** -decimals:
            return False
    return True


def stale(path: Path, timeout: int = CELL_TIMEOUT) -> list[str]:
    """Execute ``path`` afresh and list how its committed outputs differ (empty: they are current)."""
    import nbformat

    committed = normalise(nbformat.read(path, as_version=4))
    fresh = execute(path, timeout=timeout)
    problems = [f"cell {i} ({cell.source.splitlines()[0] if cell.source else ''!r}) failed"
                for i, cell in enumerate(fresh.cells) if cell.cell_type == "code"
                for o in cell.outputs if o.get("output_type") == "error"]
    for i, (old, new) in enumerate(zip(signature(committed), signature(fresh))):
        if old != new and not same_but_last_digits(repr(old), repr(new)):
            problems.append(f"code cell {i}: committed outputs {old!r:.300} != fresh {new!r:.300}")
    return problems


def regenerate(path: Path, timeout: int = CELL_TIMEOUT) -> None:
    """Execute ``path`` in quick mode and write it back with its fresh, normalised outputs."""
    import nbformat

    nb = execute(path, timeout=timeout)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    if errors:
        raise SystemExit(f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')} (not written)")
    nbformat.write(nb, path)


def main(argv=None) -> int:
    """``python -m keyscope.studies.notebooks [--check] [NAME ...]`` (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m keyscope.studies.notebooks",
                                     description="Execute the notebooks in quick mode and rewrite their outputs "
                                                 "(or, with --check, compare them with the committed ones).")
    parser.add_argument("names", nargs="*", help="notebooks (names in notebooks/ or paths; default: all)")
    parser.add_argument("--check", action="store_true", help="compare only; exit status 1 when outputs are stale")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT,
                        help=f"seconds one cell may run (default {CELL_TIMEOUT})")
    args = parser.parse_args(argv)
    status = 0
    for path in notebooks(args.names):
        if args.check:
            problems = stale(path, args.timeout)
            print(f"{path.name}: " + ("current" if not problems else "STALE\n  " + "\n  ".join(problems)))
            status |= bool(problems)
        else:
            regenerate(path, args.timeout)
            print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
