"""Cached artefacts (key covariances, …) on disk, keyed by the config that produced them.

An artefact of kind ``kind`` computed from a JSON-serialisable ``spec`` lives in
``<root>/<kind>/<sha256(spec)[:16]>/`` with two files:

* ``tensors.safetensors`` — the named tensors;
* ``spec.json`` — the spec itself, the file's size and SHA-256 checksum, and the keyscope version.

Writes are atomic (:mod:`keyscope._infra.atomic`: temporary file in the same folder, then ``os.replace``) and
``spec.json`` is written last, so a crash leaves either the old artefact or no artefact. Every load checks the spec, size and
checksum: a truncated, edited or mismatched artefact raises :class:`CorruptCache` from :func:`load`, and
:func:`cached` turns that into a warning and recomputes — a damaged file is never used silently.

The root is ``$KEYSCOPE_CACHE`` if set, else ``~/.cache/keyscope``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from keyscope._infra.atomic import atomic_write, write_text
from keyscope._infra.errors import CorruptCache

TENSORS = "tensors.safetensors"
SPEC = "spec.json"
FORMAT = 1


def cache_root(root: str | Path | None = None) -> Path:
    """``root`` if given, else ``$KEYSCOPE_CACHE``, else ``~/.cache/keyscope``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("KEYSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "keyscope"


def canonical_json(spec: dict) -> str:
    """``spec`` as canonical JSON (sorted keys, no spaces): what :func:`spec_hash` hashes."""
    try:
        return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cache specs must be plain JSON (str, int, float, bool, None, lists, dicts): {exc}") from exc


def spec_hash(spec: dict) -> str:
    """The first 16 hex digits of the SHA-256 of the canonical JSON of ``spec``."""
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()[:16]


def artefact_dir(kind: str, spec: dict, root: str | Path | None = None) -> Path:
    """The folder of the artefact ``kind`` with ``spec`` (it need not exist)."""
    return cache_root(root) / kind / spec_hash(spec)


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save(kind: str, spec: dict, tensors: dict[str, torch.Tensor], root: str | Path | None = None) -> Path:
    """Store ``tensors`` as artefact ``kind``/``spec`` atomically; return its folder."""
    from safetensors.torch import save_file

    from keyscope import __version__

    folder = artefact_dir(kind, spec, root)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(folder / TENSORS, lambda tmp: save_file(payload, tmp))
    file = folder / TENSORS
    record = {
        "format": FORMAT,
        "kind": kind,
        "spec": json.loads(canonical_json(spec)),
        "file": TENSORS,
        "bytes": file.stat().st_size,
        "sha256": sha256_file(file),
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype)} for name, t in payload.items()},
        "keyscope_version": __version__,
    }
    text = json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False)
    write_text(folder / SPEC, text)
    return folder


def load(kind: str, spec: dict, root: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Load artefact ``kind``/``spec``.

    Raises :class:`FileNotFoundError` if it was never stored, and :class:`CorruptCache` (one line naming
    the folder) if ``spec.json`` is unreadable, the spec differs, or the tensor file is missing, truncated
    or fails its checksum.
    """
    from safetensors.torch import load_file

    folder = artefact_dir(kind, spec, root)
    spec_file, file = folder / SPEC, folder / TENSORS
    if not spec_file.exists():
        if file.exists():
            raise CorruptCache(f"cached {kind} in {folder} has no {SPEC} (interrupted write)")
        raise FileNotFoundError(folder)
    try:
        record = json.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCache(f"cached {kind} in {folder} has an unreadable {SPEC}: {exc}") from exc
    if not isinstance(record, dict) or record.get("spec") != json.loads(canonical_json(spec)) or record.get("kind") != kind:
        raise CorruptCache(f"cached {kind} in {folder} was written for a different spec")
    if not file.exists():
        raise CorruptCache(f"cached {kind} in {folder} lacks {TENSORS}")
    size = file.stat().st_size
    if size != record.get("bytes"):
        raise CorruptCache(f"cached {kind} in {folder} is truncated or altered ({size} bytes, expected {record.get('bytes')})")
    if sha256_file(file) != record.get("sha256"):
        raise CorruptCache(f"cached {kind} in {folder} fails its SHA-256 checksum")
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # a checksum-valid file that safetensors rejects: still never used silently
        raise CorruptCache(f"cached {kind} in {folder} cannot be read: {exc}") from exc
    expected = record.get("tensors", {})
    if set(tensors) != set(expected) or any(list(tensors[n].shape) != expected[n]["shape"] for n in tensors):
        raise CorruptCache(f"cached {kind} in {folder} holds tensors that do not match {SPEC}")
    return tensors


def cached(
    kind: str,
    spec: dict,
    compute: Callable[[], dict[str, torch.Tensor]],
    recompute: bool = False,
    root: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Return artefact ``kind``/``spec`` from the cache, computing and storing it if needed.

    ``compute()`` returns a dict of named tensors. With ``recompute=True`` the cache is ignored and
    overwritten. A corrupt artefact gives a :class:`UserWarning` and is recomputed; a cache folder that
    cannot be written gives a warning and the computed value is returned uncached. Loaded tensors are on
    the CPU.
    """
    if not recompute:
        try:
            return load(kind, spec, root)
        except FileNotFoundError:
            pass
        except CorruptCache as exc:
            warnings.warn(f"{exc}; recomputing it", stacklevel=2)
    tensors = compute()
    try:
        save(kind, spec, tensors, root)
    except OSError as exc:
        warnings.warn(f"could not write the {kind} cache under {cache_root(root)} ({exc}); result not cached", stacklevel=2)
    return tensors
