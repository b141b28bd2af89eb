"""Fact files: CounterFact and its descendants read into one :class:`Fact` record type.

A fact is a prompt **template** with ``{}`` where the subject goes, the subject, the true target and the
requested new one, plus the prompts an edit is evaluated on: paraphrases (the same fact reworded: an edit
should reach them), neighbourhood prompts (other subjects with the same true target: an edit should leave
them alone, their answer is ``locality_ground_truth``) and rephrased subjects (aliases; Yan et al., "Keys to
Robust Edits").

Schemas (:func:`detect_schema`, on the parsed JSON; ``.jsonl`` files are read one record per line)
---------------------------------------------------------------------------------------------------
* ``counterfact`` — the original CounterFact release (Meng et al. 2022): a record has
  ``requested_rewrite{prompt, subject, target_new{str}, target_true{str}, relation_id}`` and
  ``paraphrase_prompts``, ``neighborhood_prompts`` (plus ``attribute_prompts``, ``generation_prompts``, kept
  as extras). The prompt is already a template.
* ``easyedit`` — EasyEdit/MEND's simplified CounterFact: a record has ``ground_truth`` (the true target)
  next to a filled ``prompt``, ``subject``, ``target_new``, ``rephrase_prompt``, ``locality_prompt``,
  ``locality_ground_truth`` (single strings, lists accepted).
* ``rep`` — the REP release of Yan et al.: ``target_true`` next to a **filled** ``prompt``, with
  ``rephrase_prompt`` (list or null), ``locality_prompt`` (list), ``locality_ground_truth`` and
  ``subject_rephrase`` (10 rephrased subjects).
* ``factworld`` — :mod:`keyscope.factworld.export`: like ``rep`` but the ``prompt`` is a template (holds
  ``{}``), with factworld's extras (``relation_id``, ``subject_rephrase_kind``, ``similar_subjects``, …).
* ``rome_known`` — ROME's "known facts" set for causal tracing (``known_id``, ``subject``, ``attribute``,
  ``template``, ``prompt``): no requested rewrite, so ``target_new`` is ``None``.
* ``patil_paraphrases`` — Patil et al. (2023)'s ``{filled prompt + " " + true target: [paraphrases]}`` table;
  not facts: read it with :func:`load_paraphrases` and join it with :func:`attach_paraphrases`.

The first record that is a JSON object decides the schema, by the first rule that matches: a
``requested_rewrite`` key → ``counterfact``; ``known_id`` (or ``template`` and ``attribute``) →
``rome_known``; ``ground_truth`` → ``easyedit``; ``target_true`` and a ``prompt`` holding ``{}`` (or
factworld's ``subject_rephrase_kind``) → ``factworld``; ``target_true`` → ``rep``. A top-level object
whose values are lists of strings is ``patil_paraphrases``. Anything else is :class:`UnknownSchema`.

Filled prompts become templates
-------------------------------
The subject's **first** occurrence in the prompt becomes ``{}``: exactly, else after Unicode NFC
normalisation, else ignoring case, runs of whitespace and the ``'``/``’`` apostrophe difference. When only
the lenient match succeeds, the fact's ``subject`` is the subject **as written in the prompt** (so
``template.format(subject)`` gives back the dataset's prompt, the text a model is evaluated on) and the
dataset's spelling is kept in ``extras["subject_given"]``. A subject that does not occur at all is a
:class:`~keyscope._infra.errors.SubjectNotFound` failure.

Every record problem is a :class:`Failure` naming the record's index and the field; :func:`read_facts`
collects them all, :func:`load_facts` raises the first (``MalformedRecord`` or ``SubjectNotFound``, one line
with index and field) unless told to skip. Sequences in a :class:`Fact` are tuples.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from keyscope._infra.errors import KeyscopeError, MalformedRecord, SubjectNotFound
from keyscope.data.prompts import SLOT, encode, fill, locate, unknown_pieces, unknown_token_message

FACTWORLD = "factworld"

COUNTERFACT = "counterfact"
EASYEDIT = "easyedit"
REP = "rep"
FACTWORLD_SCHEMA = "factworld"
ROME_KNOWN = "rome_known"
PATIL = "patil_paraphrases"
FACT_SCHEMAS = (COUNTERFACT, EASYEDIT, REP, FACTWORLD_SCHEMA, ROME_KNOWN)


class UnknownSchema(KeyscopeError):
    """A file that is not JSON or not in any of the schemas keyscope reads."""


@dataclass(frozen=True)
class Fact:
    """One fact and the prompts an edit of it is evaluated on.

    ``prompt`` is a template with ``{}`` for the subject (``fill(prompt, subject)`` gives the text).
    ``paraphrase_prompts`` and ``neighborhood_prompts`` are filled prompts; ``locality_ground_truth`` is the
    neighbourhood prompts' answer; ``subject_rephrase`` holds rephrased forms of the subject (may be empty).
    ``target_new`` is ``None`` for sets without a requested rewrite (``rome_known``). ``extras`` keeps the
    schema's other fields (``attribute_prompts``, ``subject_rephrase_kind``, ``subject_given`` …).
    """

    case_id: int | str
    prompt: str
    subject: str
    target_new: str | None
    target_true: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    locality_ground_truth: str | None = None
    subject_rephrase: tuple[str, ...] = ()
    relation_id: str | None = None
    extras: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject in its slot."""
        return fill(self.prompt, self.subject).text


@dataclass(frozen=True)
class Failure:
    """A record that could not be read: its index in the file, the field at fault (``None`` for the whole
    record), and why."""

    index: int
    field: str | None
    reason: str
    kind: str = "malformed"  # "malformed", "subject_not_found" or "unknown_token"

    def __str__(self) -> str:
        where = f"record {self.index}" + (f", field {self.field!r}" if self.field else "")
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class FactFile:
    """What :func:`read_facts` found in a source: its schema, how many records, the facts (with the index of
    the record each came from), the failures, and the records as read (:func:`fact_records`)."""

    source: str
    schema: str
    n_records: int
    facts: tuple[Fact, ...]
    failures: tuple[Failure, ...]
    indices: tuple[int, ...] = ()  # record index of each fact
    records: tuple = field(default=(), repr=False, compare=False)  # the parsed JSON records, in file order
    duplicates: int = 0  # facts of a later file that an earlier file of the same --data had (same case id and fact)


class _RecordError(Exception):
    """Internal: one record's failure, turned into a :class:`Failure`."""

    def __init__(self, field_name: str | None, reason: str, kind: str = "malformed"):
        super().__init__(reason)
        self.field, self.reason, self.kind = field_name, reason, kind


# ---------------------------------------------------------------------------------------------- reading


def _read_json(path: Path):
    """The parsed JSON of ``path`` (JSON lines if the whole file is not one JSON value)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UnknownSchema(f"cannot read fact file {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) > 1:
            try:
                return [json.loads(line) for line in lines]
            except json.JSONDecodeError:
                pass
        raise UnknownSchema(f"{path} is not valid JSON or JSON lines ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc


def detect_schema(data) -> str:
    """The schema of parsed fact-file JSON ``data`` (see the module docstring for the rules)."""
    if isinstance(data, dict):
        if data and all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in data.values()):
            return PATIL
        raise UnknownSchema(f"a JSON object with keys {_keys(data)} is not a fact file; expected a list of records")
    if not isinstance(data, list):
        raise UnknownSchema(f"expected a JSON list of records, found {type(data).__name__}")
    first = next((r for r in data if isinstance(r, dict)), None)
    if first is None:
        raise UnknownSchema("the file holds no records (no JSON objects in the list)")
    if "requested_rewrite" in first:
        return COUNTERFACT
    if "known_id" in first or ("template" in first and "attribute" in first):
        return ROME_KNOWN
    if "ground_truth" in first:
        return EASYEDIT
    if "target_true" in first:
        prompt = first.get("prompt")
        if "subject_rephrase_kind" in first or (isinstance(prompt, str) and SLOT in prompt):
            return FACTWORLD_SCHEMA
        return REP
    raise UnknownSchema(
        f"records with keys {_keys(first)} match no known schema "
        f"(CounterFact, EasyEdit CounterFact, REP, factworld, ROME known facts, Patil paraphrases)"
    )


def _keys(record: Mapping) -> str:
    keys = sorted(map(str, record))
    return "[" + ", ".join(keys[:8]) + (", …" if len(keys) > 8 else "") + "]"


def _get(record: Mapping, path: str, required: bool = True):
    """``record[a][b]`` for ``path = "a.b"``; ``_RecordError`` naming ``path`` if required and missing."""
    value = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            if required:
                raise _RecordError(path, "missing")
            return None
        value = value[part]
    return value


def _string(record: Mapping, path: str, required: bool = True, allow_empty: bool = False) -> str | None:
    value = _get(record, path, required)
    if value is None and not required:
        return None
    if isinstance(value, Mapping) and "str" in value:  # CounterFact's {"str": …, "id": …} targets
        value = value["str"]
    if not isinstance(value, str):
        raise _RecordError(path, f"not a string (found {type(value).__name__})")
    if not allow_empty and not value.strip():
        raise _RecordError(path, "empty")
    return value


def _strings(record: Mapping, path: str) -> tuple[str, ...]:
    """An optional list of strings (a single string or null accepted)."""
    value = _get(record, path, required=False)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _RecordError(path, "not a list of strings")
    return tuple(v for v in value if v.strip())


def _answer(record: Mapping, path: str) -> str | None:
    """An optional answer string; a list holding one string (EasyEdit variants) is accepted."""
    value = _get(record, path, required=False)
    if isinstance(value, list) and len(value) >= 1 and all(isinstance(v, str) for v in value):
        value = value[0]
    if value is None:
        return None
    if not isinstance(value, str):
        raise _RecordError(path, f"not a string (found {type(value).__name__})")
    return value


def _case_id(record: Mapping, index: int, key: str = "case_id") -> int | str:
    value = record.get(key, index)
    if not isinstance(value, (int, str)) or isinstance(value, bool):
        raise _RecordError(key, f"not an integer or string (found {type(value).__name__})")
    return value


def _templated(prompt_field: str, prompt: str, subject: str) -> tuple[str, str, dict]:
    """``(template, subject as written, extras)``: a template is kept as it is; a filled prompt gets ``{}`` at
    the subject's first occurrence, found leniently (:func:`keyscope.data.prompts.fill`)."""
    try:
        span = fill(prompt, subject, lenient=True)
    except SubjectNotFound as exc:
        raise _RecordError(prompt_field, str(exc), kind="subject_not_found") from exc
    template, written = (prompt, subject) if SLOT in prompt else (span.template, span.subject)
    if template.count(SLOT) > 1:
        raise _RecordError(prompt_field, f"{template!r} has {template.count(SLOT)} subject slots {SLOT}; a prompt "
                                         f"takes exactly one")
    return template, written, ({} if written == subject else {"subject_given": subject})


def _rest(record: Mapping, used: Iterable[str]) -> dict:
    used = set(used)
    return {k: v for k, v in record.items() if k not in used}


def _counterfact(record: Mapping, index: int) -> Fact:
    rewrite = _get(record, "requested_rewrite")
    if not isinstance(rewrite, Mapping):
        raise _RecordError("requested_rewrite", "not a JSON object")
    subject = _string(record, "requested_rewrite.subject")
    prompt = _string(record, "requested_rewrite.prompt")
    template, subject_written, extra = _templated("requested_rewrite.prompt", prompt, subject)
    target_true = _string(record, "requested_rewrite.target_true")
    extras = _rest(record, ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts", "subject_rephrase"))
    for side in ("target_new", "target_true"):
        target = rewrite.get(side)
        if isinstance(target, Mapping) and "id" in target:
            extras[f"{side}_id"] = target["id"]
    return Fact(
        case_id=_case_id(record, index),
        prompt=template,
        subject=subject_written,
        target_new=_string(record, "requested_rewrite.target_new"),
        target_true=target_true,
        paraphrase_prompts=_strings(record, "paraphrase_prompts"),
        neighborhood_prompts=_strings(record, "neighborhood_prompts"),
        locality_ground_truth=target_true,
        subject_rephrase=_strings(record, "subject_rephrase"),
        relation_id=_string(record, "requested_rewrite.relation_id", required=False),
        extras={**extras, **extra},
    )


def _easyedit(record: Mapping, index: int) -> Fact:
    subject = _string(record, "subject")
    template, subject_written, extra = _templated("prompt", _string(record, "prompt"), subject)
    used = ("case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
            "locality_ground_truth", "subject_rephrase", "relation_id")
    return Fact(
        case_id=_case_id(record, index),
        prompt=template,
        subject=subject_written,
        target_new=_string(record, "target_new"),
        target_true=_string(record, "ground_truth"),
        paraphrase_prompts=_strings(record, "rephrase_prompt"),
        neighborhood_prompts=_strings(record, "locality_prompt"),
        locality_ground_truth=_answer(record, "locality_ground_truth"),
        subject_rephrase=_strings(record, "subject_rephrase"),
        relation_id=_string(record, "relation_id", required=False),
        extras={**_rest(record, used), **extra},
    )


def _rep(record: Mapping, index: int) -> Fact:
    """The REP release schema and factworld's export (whose prompt is already a template)."""
    subject = _string(record, "subject")
    template, subject_written, extra = _templated("prompt", _string(record, "prompt"), subject)
    paraphrase_key = "paraphrase_prompts" if "paraphrase_prompts" in record else "rephrase_prompt"
    neighbour_key = "neighborhood_prompts" if "neighborhood_prompts" in record else "locality_prompt"
    target_true = _string(record, "target_true")
    used = ("case_id", "prompt", "subject", "target_new", "target_true", paraphrase_key, neighbour_key,
            "locality_ground_truth", "subject_rephrase", "relation_id")
    locality = _answer(record, "locality_ground_truth")
    return Fact(
        case_id=_case_id(record, index),
        prompt=template,
        subject=subject_written,
        target_new=_string(record, "target_new"),
        target_true=target_true,
        paraphrase_prompts=_strings(record, paraphrase_key),
        neighborhood_prompts=_strings(record, neighbour_key),
        locality_ground_truth=locality,
        subject_rephrase=_strings(record, "subject_rephrase"),
        relation_id=_string(record, "relation_id", required=False),
        extras={**_rest(record, used), **extra},
    )


def _rome_known(record: Mapping, index: int) -> Fact:
    subject = _string(record, "subject")
    prompt_key = "prompt" if "prompt" in record else "template"
    template, subject_written, extra = _templated(prompt_key, _string(record, prompt_key), subject)
    used = ("known_id", "prompt", "subject", "attribute", "relation_id")
    return Fact(
        case_id=_case_id(record, index, "known_id"),
        prompt=template,
        subject=subject_written,
        target_new=None,
        target_true=_string(record, "attribute"),
        relation_id=_string(record, "relation_id", required=False),
        extras={**_rest(record, used), **extra},
    )


_PARSERS = {COUNTERFACT: _counterfact, EASYEDIT: _easyedit, REP: _rep, FACTWORLD_SCHEMA: _rep, ROME_KNOWN: _rome_known}


def parse_records(records: Sequence, schema: str) -> tuple[list[Fact], list[Failure], list[int]]:
    """``(facts, failures, indices)`` of ``records`` in ``schema`` (one of :data:`FACT_SCHEMAS`); ``indices[i]``
    is the record index of ``facts[i]``. Never raises for a record."""
    if schema not in _PARSERS:
        raise UnknownSchema(f"{schema!r} is not a fact schema; choose from {', '.join(FACT_SCHEMAS)}")
    parse = _PARSERS[schema]
    facts: list[Fact] = []
    failures: list[Failure] = []
    indices: list[int] = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            failures.append(Failure(index, None, f"not a JSON object (found {type(record).__name__})"))
            continue
        try:
            facts.append(parse(record, index))
            indices.append(index)
        except _RecordError as exc:
            failures.append(Failure(index, exc.field, exc.reason, exc.kind))
    return facts, failures, indices


def _factworld_records() -> list[dict]:
    """factworld's facts as exported records: the world of the shipped model's card, or the default world."""
    from keyscope.factworld import MODEL_CARD, export, shipped_model_dir
    from keyscope.factworld.card import world_of

    card_path = shipped_model_dir() / MODEL_CARD
    card = {}
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
        except json.JSONDecodeError as exc:
            raise KeyscopeError(f"the factworld model card {card_path} is not valid JSON ({exc})") from exc
    seed = card.get("train_config", {}).get("seed", 0)
    return export.records(world_of(card), seed=seed)


#: What separates the files of one ``--data`` that reads several (:func:`split_sources`).
SOURCE_SEPARATOR = ","


def split_sources(source: str | Path) -> list[str | Path]:
    """The files of ``source``: ``[source]`` for ``"factworld"``, a path or an existing file, else its
    comma-separated parts (``"a.json,b.json"``), each of which must exist."""
    if not isinstance(source, str) or source == FACTWORLD or SOURCE_SEPARATOR not in source or Path(source).expanduser().is_file():
        return [source]
    parts = [part.strip() for part in source.split(SOURCE_SEPARATOR)]
    if not all(parts):
        raise UnknownSchema(f"--data {source!r} has an empty file name between its commas")
    return parts


def read_facts(source: str | Path) -> FactFile:
    """Read every record of ``source`` (a fact file, ``"factworld"``, or several fact files of one schema joined
    by commas) into facts and failures.

    Several files read as one (:func:`_union`): their records in order, and each case id's fact from the first
    file that holds it (Yan et al.'s LLaMA-2, Mistral and Qwen test sets share most of their facts; the later
    copies are counted in ``FactFile.duplicates``, not loaded). A case id that names different facts in two files
    (subject, prompt or targets differ: files numbered apart), or a record without its case id, is an error. Raises :class:`UnknownSchema` (a
    :class:`KeyscopeError`, one line) for an unreadable file, invalid JSON, an unknown schema, files of different
    schemas or a Patil paraphrase table; problems of single records are returned as failures.
    """
    sources = split_sources(source)
    if len(sources) > 1:
        parts = []
        for part in sources:
            try:
                parts.append(read_facts(part))
            except UnknownSchema as exc:  # name the file at fault
                raise UnknownSchema(str(exc) if str(part) in str(exc) else f"{part}: {exc}") from exc
        return _union(parts)
    if isinstance(source, str) and source == FACTWORLD:
        records, name = _factworld_records(), FACTWORLD
        schema = FACTWORLD_SCHEMA
    else:
        records, name = _read_json(_existing(source)), str(source)
        schema = detect_schema(records)
        if schema == PATIL:
            raise UnknownSchema(f"{source} is a Patil et al. paraphrase table, not a fact file; read it with load_paraphrases")
    facts, failures, indices = parse_records(records, schema)
    return FactFile(name, schema, len(records), tuple(facts), tuple(failures), tuple(indices), tuple(records))


def _union(files: Sequence[FactFile]) -> FactFile:
    """One :class:`FactFile` of ``files``: records concatenated (record indices count through the files in
    order), each case id's fact taken from the first file that has it."""
    schemas = {f.schema for f in files}
    if len(schemas) > 1:
        raise UnknownSchema("the files of one --data must share a schema: "
                            + ", ".join(f"{f.source} is {f.schema}" for f in files))
    facts, failures, indices, records, seen, duplicates, offset = [], [], [], [], {}, 0, 0
    key = "known_id" if files[0].schema == ROME_KNOWN else "case_id"
    for f in files:
        failures += [replace(failure, index=failure.index + offset) for failure in f.failures]
        for fact, index in zip(f.facts, f.indices):
            if key not in f.records[index]:
                raise UnknownSchema(f"{f.source}: record {index} has no {key}; the files of one --data are joined by "
                                    f"case id, so each record needs its own")
            same = (fact.subject, fact.filled_prompt, fact.target_new, fact.target_true)
            if fact.case_id in seen:
                first, where = seen[fact.case_id]
                if first != same:
                    raise UnknownSchema(f"case id {fact.case_id!r} names different facts in {where} and {f.source}; "
                                        f"the files of one --data must number their facts alike")
                duplicates += 1
                continue
            seen[fact.case_id] = (same, f.source)
            facts.append(fact)
            indices.append(index + offset)
        records += f.records
        offset += f.n_records
    return FactFile(SOURCE_SEPARATOR.join(f.source for f in files), files[0].schema, offset, tuple(facts),
                    tuple(failures), tuple(indices), tuple(records), duplicates)


def fact_records(fact_file: FactFile, positions: Iterable[int]) -> list:
    """The records of the facts ``fact_file.facts[i]`` for ``i`` in ``positions``, as read (same schema, same
    fields), so that a file of them reads back as those facts. A record without its case id (``case_id``;
    ``known_id`` for ``rome_known``) had its index in the file for one; it gets that one written in, so the facts
    keep their case ids in a file of a subset."""
    key = "known_id" if fact_file.schema == ROME_KNOWN else "case_id"
    out = []
    for i in positions:
        record = fact_file.records[fact_file.indices[i]]
        out.append(record if key in record else {key: fact_file.facts[i].case_id, **record})
    return out


def _existing(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise UnknownSchema(f"fact file {source} does not exist; pass a JSON fact file or 'factworld'")
    return path


def sniff_schema(source: str | Path) -> str:
    """The schema of a fact or paraphrase file (``"factworld"`` for the factworld source); see
    :func:`detect_schema`. Raises :class:`UnknownSchema` for an unreadable or unknown file."""
    if isinstance(source, str) and source == FACTWORLD:
        return FACTWORLD_SCHEMA
    sources = split_sources(source)
    if len(sources) > 1:
        return read_facts(source).schema
    return detect_schema(_read_json(_existing(source)))


def locate_subjects(tokenizer, fact_file: FactFile, prepend_bos: bool | None = None) -> list[Failure]:
    """Check that every fact's subject has a last token in the tokenisation of its filled prompt
    (:func:`keyscope.data.prompts.locate`) and that neither the subject there nor a target (after a space, as it
    follows the prompt) holds the tokenizer's unknown token; one :class:`Failure` (record index, field
    ``subject``, ``target_new`` or ``target_true``) per fact where not (at most one per fact)."""
    failures = []
    for index, fact in zip(fact_file.indices or range(len(fact_file.facts)), fact_file.facts):
        try:
            encoded, _ = locate(tokenizer, fact.prompt, fact.subject, prepend_bos=prepend_bos)
        except SubjectNotFound as exc:
            failures.append(Failure(index, "subject", str(exc), "subject_not_found"))
            continue
        span = fill(fact.prompt, fact.subject)
        pieces = unknown_pieces(tokenizer, encoded, span.start, span.end)
        if pieces:
            failures.append(Failure(index, "subject", unknown_token_message(tokenizer, pieces, repr(fact.subject)),
                                    "unknown_token"))
            continue
        for name in ("target_new", "target_true"):
            target = getattr(fact, name)
            pieces = unknown_pieces(tokenizer, encode(tokenizer, " " + target.strip(), prepend_bos=False)) if target else []
            if pieces:
                failures.append(Failure(index, name, unknown_token_message(tokenizer, pieces, repr(target)), "unknown_token"))
                break
    return failures


def load_facts(source: str | Path, on_error: str = "raise") -> list[Fact]:
    """The facts of ``source``: a JSON/JSON-lines fact file in any schema of the module docstring, or
    ``"factworld"`` (the world of the shipped factworld model's card, else the default :class:`WorldConfig`).

    ``on_error="raise"`` (default) raises the first failing record's error — :class:`MalformedRecord` or
    :class:`~keyscope._infra.errors.SubjectNotFound`, one line naming the record index and field;
    ``on_error="skip"`` leaves failing records out (see :func:`read_facts` for the list of failures).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    result = read_facts(source)
    if result.failures and on_error == "raise":
        failure = result.failures[0]
        error = SubjectNotFound if failure.kind == "subject_not_found" else MalformedRecord
        exc = error(f"{result.source}: {failure}")
        exc.index, exc.field = failure.index, failure.field  # type: ignore[attr-defined]
        raise exc
    return list(result.facts)


# ---------------------------------------------------------------------------------------------- paraphrases


def paraphrase_key(fact: Fact) -> str:
    """The key of ``fact`` in Patil et al.'s table: the filled prompt, a space, the true target."""
    return f"{fact.filled_prompt} {fact.target_true.strip()}"


def load_paraphrases(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Patil et al. (2023)'s paraphrase table ``{filled prompt + " " + true target: [paraphrased prompts]}``.

    Raises :class:`UnknownSchema` for a file of another shape and :class:`MalformedRecord` (naming the key)
    for an entry that is not a list of strings.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UnknownSchema(f"paraphrase file {path} does not exist")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UnknownSchema(f"{path} is not a paraphrase table: expected a JSON object, found {type(data).__name__}")
    table: dict[str, tuple[str, ...]] = {}
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MalformedRecord(f"{path}: entry {index} ({key!r}) should be a list of strings")
        table[" ".join(key.split())] = tuple(value)
    return table


def attach_paraphrases(facts: Iterable[Fact], table: Mapping[str, Sequence[str]]) -> tuple[list[Fact], int]:
    """``(facts, n_matched)``: each fact with its Patil paraphrases appended to ``paraphrase_prompts``.

    Facts are matched by :func:`paraphrase_key` (whitespace runs collapsed, as in :func:`load_paraphrases`);
    duplicates of existing paraphrases are not added, order is kept — as in the REP release, whose
    ``rephrase_prompt`` lists CounterFact's two paraphrases followed by Patil's.
    """
    out: list[Fact] = []
    matched = 0
    for fact in facts:
        extra = table.get(" ".join(paraphrase_key(fact).split()))
        if extra is None:
            out.append(fact)
            continue
        matched += 1
        merged = tuple(dict.fromkeys((*fact.paraphrase_prompts, *(p for p in extra if p.strip()))))
        out.append(replace(fact, paraphrase_prompts=merged))
    return out, matched
