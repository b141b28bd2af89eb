"""Result rows: one CSV writer (and its reader) and one percent format for every experiment."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from keyscope._infra.atomic import atomic_write


def write_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` (dicts) as CSV with the union of their keys as columns (first-seen order; missing
    cells empty), atomically (:func:`keyscope._infra.atomic.atomic_write`)."""
    path = Path(path)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def read_csv(path: str | Path) -> list[dict]:
    """The rows of a CSV written by :func:`write_csv`, as dicts of strings (empty cells ``""``)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction in percent without the sign (``0.953`` → ``"95.3"``); ``"n/a"`` for ``None``."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}"
