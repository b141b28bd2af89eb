"""Small output helpers shared by the CLI commands (JSON reports, tables)."""

from __future__ import annotations

import json
import os
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
    a folder and its folder must be creatable; the nearest existing parent must be a writable folder."""
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


def write_json(path: str | None, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (nothing if ``path`` is empty) and say so."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
