"""Published settings as data: the hyper-parameter tables keyscope ships as JSON files beside the modules that
read them (``keyscope/editing/hparams/*.json``, ``keyscope/model/edit_layers.json``), every entry with its
citation.

A file holds one or more named tables::

    {
      "description": "what the file is",
      "tables": {
        "family": {                                   # a table: entry name -> entry
          "gpt2": {
            "source": "kmeng01/rome hparams/ROME/gpt2-xl.json",   # where the values come from (required)
            "values": {"v_lr": 0.5, ...},                          # the settings (required)
            "field_sources": {"v_lr": "..."},                      # a citation per field (optional)
            "note": "..."                                          # anything else a reader needs (optional)
          }
        }
      }
    }

:func:`load` reads a file once (cached), checks this schema — an unknown key anywhere, a missing or empty
``source``, a ``field_sources`` entry for a field the entry does not set, or (given ``fields``) a value for a field
the consumer does not have raises :class:`~keyscope._infra.errors.KeyscopeError` naming the file — and gives a
:class:`PublishedTable`: the values without their citations (JSON arrays as tuples, so they compare equal to the
dataclass fields they feed) and the citation of each entry (:meth:`PublishedTable.citation`). Standard library
only; no model code.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

from keyscope._infra.errors import KeyscopeError

__all__ = ["PublishedTable", "load"]

_FILE_KEYS = {"description", "tables"}
_ENTRY_KEYS = {"source", "values", "field_sources", "note"}


@dataclass(frozen=True)
class PublishedTable:
    """One table of a published-settings file: ``values[name]`` the settings of entry ``name`` (a fresh ``dict``
    per call of :meth:`entries`), ``sources[name]`` its citation, ``field_sources[name]`` per-field citations."""

    path: str
    table: str
    values: Mapping[str, Mapping]
    sources: Mapping[str, str]
    field_sources: Mapping[str, Mapping[str, str]]

    def entries(self) -> dict[str, dict]:
        """``{name: {field: value}}``: every entry's values, without citations (new dicts, safe to change)."""
        return {name: dict(values) for name, values in self.values.items()}

    def citation(self, name: str, field: str | None = None) -> str:
        """Where entry ``name`` (or its ``field``, when that field has its own citation) comes from."""
        if name not in self.sources:
            raise KeyError(f"{self.path} [{self.table}] has no entry {name!r}")
        if field is not None and field in self.field_sources.get(name, {}):
            return self.field_sources[name][field]
        return self.sources[name]


def _frozen(value):
    """JSON arrays as tuples, recursively (``[[5, 10], [10, 10]]`` → ``((5, 10), (10, 10))``)."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def load(package: str, filename: str, table: str, fields: Iterable[str] | None = None) -> PublishedTable:
    """Table ``table`` of the published-settings file ``filename`` shipped in ``package`` (module docstring).

    ``fields``: the names a value may have (the fields of the config class it feeds); ``None`` skips that check.
    Raises :class:`~keyscope._infra.errors.KeyscopeError` naming the file for a file that is missing, not JSON or
    off the schema."""
    return _load(package, filename, table, None if fields is None else frozenset(fields))


@functools.cache
def _read(package: str, filename: str) -> tuple[str, dict]:
    resource = resources.files(package) / filename
    where = f"{package.replace('.', '/')}/{filename}"
    try:
        data = json.loads(resource.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise KeyscopeError(f"the published settings file {where} is missing from the installed package") from exc
    except json.JSONDecodeError as exc:
        raise KeyscopeError(f"the published settings file {where} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("tables"), dict):
        raise KeyscopeError(f"the published settings file {where} must be an object with a 'tables' object")
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise KeyscopeError(f"the published settings file {where} has unknown keys {unknown} "
                            f"(allowed: {sorted(_FILE_KEYS)})")
    return where, data


@functools.cache
def _load(package: str, filename: str, table: str, fields: frozenset | None) -> PublishedTable:
    where, data = _read(package, filename)
    if table not in data["tables"]:
        raise KeyscopeError(f"the published settings file {where} has no table {table!r} "
                            f"(it has {sorted(data['tables'])})")
    values, sources, field_sources = {}, {}, {}
    for name, entry in data["tables"][table].items():
        at = f"{where} [{table}] entry {name!r}"
        if not isinstance(entry, dict):
            raise KeyscopeError(f"{at} must be an object")
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise KeyscopeError(f"{at} has unknown keys {unknown} (allowed: {sorted(_ENTRY_KEYS)})")
        source = entry.get("source")
        if not isinstance(source, str) or not source.strip():
            raise KeyscopeError(f"{at} has no source: cite the repository and file (or paper section) it comes from")
        if not isinstance(entry.get("values"), dict):
            raise KeyscopeError(f"{at} has no 'values' object")
        if fields is not None:
            foreign = sorted(set(entry["values"]) - fields)
            if foreign:
                raise KeyscopeError(f"{at} sets unknown fields {foreign}")
        per_field = entry.get("field_sources", {})
        if not isinstance(per_field, dict):
            raise KeyscopeError(f"{at}: 'field_sources' must be an object of field -> citation")
        uncited = sorted(set(per_field) - set(entry["values"]))
        if uncited:
            raise KeyscopeError(f"{at} cites fields it does not set: {uncited}")
        values[name] = MappingProxyType({k: _frozen(v) for k, v in entry["values"].items()})
        sources[name] = source
        field_sources[name] = MappingProxyType(dict(per_field))
    return PublishedTable(where, table, MappingProxyType(values), MappingProxyType(sources),
                          MappingProxyType(field_sources))
