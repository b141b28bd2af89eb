"""``keyscope data PATH [--model M | --tokenizer DIR] [--json OUT]``: check a fact file before using it.

Prints the detected schema, the number of records, how many loaded as facts, how many subjects the tokenizer
locates in their prompts with every token known, and each failure with its record index and reason: a
malformed record (a prompt with more than one ``{}`` among them), a subject not in its prompt, and — with the
tokenizer — a subject or target holding the tokenizer's unknown token. Exit status 0 when every record loads
and locates, 1 when some fail, 2 (one line) for an unreadable file or an unknown schema.
Without ``--model``/``--tokenizer`` subjects are located by characters only (the template conversion).
A Patil et al. paraphrase table is recognised and counted (it has no subjects to locate).
"""

from __future__ import annotations

from keyscope.cli.common import add_progress_argument
from keyscope.cli.output import write_json
from keyscope.errors import KeyscopeError


def _tokenizer(args):
    if args.model:
        from keyscope.models import load_model

        return load_model(args.model).tokenizer, args.model
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(args.tokenizer), args.tokenizer
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KeyscopeError(f"cannot load a tokenizer from {args.tokenizer}: {first[:200]}") from exc
    return None, None


def _paraphrase_report(path: str) -> dict:
    from keyscope.datasets import PATIL, load_paraphrases

    table = load_paraphrases(path)
    return {"schema": PATIL, "records": len(table), "loaded": len(table), "located": None, "failures": []}


def cmd_data(args) -> int:
    from keyscope import datasets

    schema = datasets.sniff_schema(args.path)
    if schema == datasets.PATIL:
        report = _paraphrase_report(args.path)
        print(f"schema: {schema}\nrecords: {report['records']}\nloaded: {report['loaded']} "
              f"(paraphrase lists; join them to facts with attach_paraphrases)")
        write_json(args.json, report)
        return 0
    fact_file = datasets.read_facts(args.path)
    tokenizer, tokenizer_name = _tokenizer(args)
    failures = list(fact_file.failures)
    if tokenizer is not None:
        failures += datasets.locate_subjects(tokenizer, fact_file)
        how = f"by the tokenizer of {tokenizer_name}"
    else:
        how = "by characters only; pass --model or --tokenizer to check tokens"
    located = len(fact_file.facts) - (len(failures) - len(fact_file.failures))
    failures.sort(key=lambda f: f.index)
    print(f"schema: {fact_file.schema}")
    print(f"records: {fact_file.n_records}")
    print(f"loaded: {len(fact_file.facts)}")
    print(f"located: {located} ({how})")
    print(f"failures: {len(failures)}")
    for failure in failures:
        print(f"  {failure}")
    write_json(args.json, {
        "schema": fact_file.schema,
        "records": fact_file.n_records,
        "loaded": len(fact_file.facts),
        "located": located,
        "failures": [{"index": f.index, "field": f.field, "reason": f.reason, "kind": f.kind} for f in failures],
    })
    return 1 if failures else 0


def register(sub) -> None:
    """Add ``keyscope data`` to the top-level subparsers ``sub``."""
    p = sub.add_parser("data", help="detect a fact file's schema, load it and locate its subjects")
    p.add_argument("path", help="a CounterFact / EasyEdit / REP / factworld / ROME-known JSON file, a Patil "
                                "paraphrase table, or 'factworld'")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="locate subjects with this model's tokenizer (factworld, hub name, directory)")
    which.add_argument("--tokenizer", metavar="DIR", help="locate subjects with this Hugging Face tokenizer")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    add_progress_argument(p)
    p.set_defaults(func=cmd_data)
