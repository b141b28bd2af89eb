"""Small output helpers shared by the CLI commands (JSON reports, tables)."""

from __future__ import annotations

import json
from pathlib import Path


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
