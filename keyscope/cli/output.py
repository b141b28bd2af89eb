"""Output paths of the CLI commands: checked before any work (:func:`check_outputs`), written atomically
(:func:`write_json`), and removed again when a command fails (:func:`nothing_left_on_failure`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from keyscope.errors import KeyscopeError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_outputs(*, folders: dict[str, str | None] | None = None, files: dict[str, str | None] | None = None) -> None:
    """Refuse, before any work, output paths that could not be written: ``{option: path}`` for folders
    (``--out``) and files (``--json``, ``--export``). A folder must be a folder or creatable; a file must not be
    a folder and its folder must be creatable; the nearest existing parent must be a folder in which a file can
    be created (tried with a temporary file, removed at once)."""
    for kind, paths in (("folder", folders or {}), ("file", files or {})):
        for option, value in paths.items():
            if not value:
                continue
            path = Path(value)
            if kind == "folder" and path.exists() and not path.is_dir():
                raise KeyscopeError(f"{option} {value} is a file; give a folder")
            if kind == "file" and path.is_dir():
                raise KeyscopeError(f"{option} {value} is a folder; give a file path")
            base = _nearest_existing(path if kind == "folder" else path.parent)
            if not base.is_dir():
                raise KeyscopeError(f"{option} {value}: {base} is not a folder")
            if not os.access(base, os.W_OK | os.X_OK):
                raise KeyscopeError(f"{option} {value}: {base} is not writable")
            try:  # os.access says yes to root everywhere, and knows nothing of read-only or virtual file systems
                fd, probe = tempfile.mkstemp(prefix=".keyscope-probe-", dir=base)
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                raise KeyscopeError(f"{option} {value}: cannot write in {base} ({exc.strerror or exc})") from exc


def write_json(path: str | None, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (nothing if ``path`` is empty) and say so: into a temporary file
    beside it, moved into place at the end and removed if anything fails."""
    if not path:
        return
    from keyscope.cache import atomic_write

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2) + "\n"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"wrote {out}")


def _entries(folder: Path) -> set[Path]:
    """The names directly in ``folder`` (not below: ``--out .`` must not walk a whole tree)."""
    return set(folder.iterdir()) if folder.is_dir() else set()


def _first_missing(path: Path) -> Path | None:
    """The highest folder of ``path`` (itself included) that does not exist yet: what creating it creates."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def nothing_left_on_failure(folders: Mapping[str, str | None], files: Mapping[str, str | None]) -> Iterator[None]:
    """Inside the block a command writes its outputs; if the block raises (an error, Ctrl-C), whatever it
    created is removed: the folders of ``folders`` (``{option: folder}``) that did not exist (with any parent it
    had to create), else the entries it added directly in them, and the files of ``files`` (``{option: path}``)
    that did not exist (with their new parents). So a failed run leaves nothing partial behind; what existed
    before is kept."""
    created: list[Path] = []  # paths that did not exist: remove them whole
    added: dict[Path, set[Path]] = {}  # existing folders: remove what is new in them
    for value in folders.values():
        if value:
            root = Path(value)
            missing = _first_missing(root)
            if missing is None:
                added[root] = _entries(root)
            else:
                created.append(missing)
    for value in files.values():
        if value and not Path(value).exists():
            created.append(_first_missing(Path(value).parent) or Path(value))
    try:
        yield
    except BaseException:
        for root, entries in added.items():
            for entry in _entries(root) - entries:
                _remove(entry)
        for path in created:
            _remove(path)
        raise
