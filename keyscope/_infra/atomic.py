"""Atomic files: every file keyscope writes — a cached tensor, a figure, a CSV, a markdown table or report, a
JSON record — appears whole or not at all.

:func:`atomic_write` lets a writer fill a temporary file beside the target (``.<name>.<random>.tmp``, same
folder and so same file system), syncs it, and renames it over the target (``os.replace``, atomic on POSIX);
on any error, Ctrl-C included, the temporary file is removed and the target is left as it was. A crash
mid-write therefore never leaves a truncated file, and a file that is rewritten gets a *new* inode: a hard link
made to the old file beforehand keeps the old content (what :func:`keyscope.cli.output.nothing_left_on_failure`
relies on to put overwritten outputs back). :func:`write_text` and :func:`save_figure` are the two common
writers on top of it; the folder of the target must exist.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file in the same folder, which is synced and
    then renamed over ``path`` (``os.replace``); on any error the temporary file is removed and ``path`` is
    left as it was. Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # the mode a plain open() would give, not mkstemp's owner-only 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_figure(figure, path: str | Path, **kwargs) -> Path:
    """Save a matplotlib ``figure`` to ``path`` atomically (``savefig`` keyword arguments pass through); the
    format is the one ``path``'s suffix names (the temporary file ends in ``.tmp``). Returns ``path``."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".").lower() or None)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, **kwargs))
