"""``keyscope data PATH [--model M | --tokenizer DIR] [--known [--write-known FACTS]] [--json OUT]``: check a fact
file before using it, and count the facts a model knows.

Prints the detected schema, the number of records, how many loaded as facts, how many subjects the tokenizer
locates in their prompts with every token known, and each failure with its record index and reason: a
malformed record (a prompt with more than one ``{}`` among them), a subject not in its prompt, and — with the
tokenizer — a subject or target holding the tokenizer's unknown token. Exit status 0 when every record loads
and locates, 1 when some fail, 2 (one line) for an unreadable file or an unknown schema.
Without ``--model``/``--tokenizer`` subjects are located by characters only (the template conversion).
A Patil et al. paraphrase table is recognised and counted (it has no subjects to locate).

With ``--known`` (it needs ``--model``) the loaded facts are judged as ROME and Yan et al. keep them: known when the
model's top-1 next token after the filled prompt is the first token of ``target_true``
(:func:`keyscope.analysis.predictions.known_facts`; a fact without a ``target_true`` is not judged). It prints and reports
``known`` and ``not_judged`` (counts) and ``known_case_ids``; ``--write-known FACTS`` (which implies ``--known``)
also writes the records of the known facts, as they are in the file (a JSON list; a record without its case id gets
the one it had, its index), so any command reads them back with ``--data FACTS`` as the same facts. Every command's
``--known`` makes the same judgement of the same facts. The known count does not change the exit status.
"""

from __future__ import annotations

from keyscope._infra.errors import KeyscopeError
from keyscope.cli.common import (
    add_device_argument,
    add_dtype_argument,
    add_progress_argument,
    command_parser,
    dtype_of,
)
from keyscope.cli.output import write_json


def _check_model_options(args) -> None:
    """A one-line error, before any work, for an option that needs ``--model`` given without it."""
    if args.model:
        return
    for flag, given in (("--known", args.known), ("--write-known", args.write_known), ("--dtype", args.dtype),
                        ("--device", args.device)):
        if given:
            why = ("the model whose top-1 predictions judge the facts" if flag not in ("--dtype", "--device")
                   else "the model to load")
            raise KeyscopeError(f"{flag} needs --model ({why})")


def _tokenizer(args, model):
    if model is not None:
        return model.tokenizer, args.model
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(args.tokenizer), args.tokenizer
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KeyscopeError(f"cannot load a tokenizer from {args.tokenizer}: {first[:200]}") from exc
    return None, None


def _paraphrase_report(path: str) -> dict:
    from keyscope.data.datasets import PATIL, load_paraphrases

    table = load_paraphrases(path)
    return {"schema": PATIL, "records": len(table), "loaded": len(table), "located": None, "failures": []}


def _known(args, model, fact_file) -> dict:
    """``{"known", "not_judged", "known_case_ids"}`` of the loaded facts, printed; their records written to
    ``--write-known``."""
    from keyscope.analysis.predictions import has_true_target, known_mask
    from keyscope.data.datasets import fact_records

    facts = fact_file.facts
    mask = known_mask(model, facts, progress=not args.no_progress)  # (n,)
    positions = [i for i, ok in enumerate(mask.tolist()) if ok]
    not_judged = sum(not has_true_target(fact) for fact in facts)
    print(f"known: {len(positions)} of {len(facts) - not_judged} judged (top-1 next token = the first token of "
          f"target_true, by {args.model})" + (f"; {not_judged} without a target_true not judged" if not_judged else ""))
    write_json(args.write_known, fact_records(fact_file, positions))
    return {"known": len(positions), "not_judged": not_judged,
            "known_case_ids": [facts[i].case_id for i in positions]}


def cmd_data(args) -> int:
    from keyscope.data import datasets

    _check_model_options(args)
    dtype = dtype_of(args)
    known = args.known or args.write_known
    schema = datasets.sniff_schema(args.path)
    if schema == datasets.PATIL:
        if known:
            raise KeyscopeError(f"--known judges facts; {args.path} is a Patil et al. paraphrase table")
        report = _paraphrase_report(args.path)
        print(f"schema: {schema}\nrecords: {report['records']}\nloaded: {report['loaded']} "
              f"(paraphrase lists; join them to facts with attach_paraphrases)")
        write_json(args.json, report)
        return 0
    fact_file = datasets.read_facts(args.path)
    model = None
    if args.model:
        from keyscope.model.models import load_model

        model = load_model(args.model, device=args.device, dtype=dtype)
    tokenizer, tokenizer_name = _tokenizer(args, model)
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
    print(f"loaded: {len(fact_file.facts)}" + (f" ({fact_file.duplicates} case ids already read from an earlier "
                                                   "file left out)" if fact_file.duplicates else ""))
    print(f"located: {located} ({how})")
    print(f"failures: {len(failures)}")
    for failure in failures:
        print(f"  {failure}")
    report = {
        "schema": fact_file.schema,
        "records": fact_file.n_records,
        "loaded": len(fact_file.facts),
        "duplicates": fact_file.duplicates,
        "located": located,
        "failures": [{"index": f.index, "field": f.field, "reason": f.reason, "kind": f.kind} for f in failures],
    }
    if known:
        report.update(_known(args, model, fact_file))
    write_json(args.json, report)
    return 1 if failures else 0


def register(sub) -> None:
    """Add ``keyscope data`` to the top-level subparsers ``sub``."""
    p = command_parser(
        sub, "data", help="detect a fact file's schema, load it and locate its subjects; with --known, count (and "
                          "write) the facts a model knows",
        description="Checks a fact file before a long run: prints the detected schema (CounterFact, EasyEdit "
                    "CounterFact, REP release, ROME known facts, factworld), the records loaded, the subjects "
                    "located in their prompts (by --model's or --tokenizer's tokens, else by characters) and each "
                    "failure with its record index. With --known, how many facts --model knows (top-1 next token = "
                    "the first token of target_true) and their case ids; --write-known also writes their records "
                    "as a fact file that any command reads with --data. Exit status 1 when some records fail.",
        examples=["keyscope data factworld",
                  "keyscope data counterfact.json --model smollm2-135m --known --write-known known.json"])
    p.add_argument("path", help="a CounterFact / EasyEdit / REP / factworld / ROME-known JSON file (or several of one "
                                "schema joined by commas, read as one: each case id from the first file holding it), "
                                "a Patil paraphrase table, or 'factworld'")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="locate subjects with this model's tokenizer (factworld, hub name, directory)")
    which.add_argument("--tokenizer", metavar="DIR", help="locate subjects with this Hugging Face tokenizer")
    add_dtype_argument(p)
    add_device_argument(p)
    p.add_argument("--known", action="store_true",
                   help="also judge which loaded facts --model knows: top-1 next token after the prompt = the first "
                        "token of target_true (ROME's and Yan et al.'s filter); reports known, not_judged and "
                        "known_case_ids")
    p.add_argument("--write-known", metavar="FACTS",
                   help="also write the known facts' records, as they are in PATH, to this JSON file (implies "
                        "--known); any command reads it with --data FACTS")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    add_progress_argument(p)
    p.set_defaults(func=cmd_data)
