"""Loaders, subject location and perturbation builders over full real fact files.

For every file given (default: the CounterFact, REP and Patil files under ``/work/shared/data``) this prints
the detected schema, the records, how many loaded as facts and how many subjects the GPT-2 tokenizer locates
in their prompts, with each failure's record index and reason; then, over the loaded facts, how many
rephrased-subject, shuffled-subject and long-context probes the builders of :mod:`keyscope.analysis.similarity` make
(long contexts of exactly ``--context-tokens`` GPT-2 tokens of Wikipedia text, checked by re-tokenising), and the
time each step takes. A Patil paraphrase table is joined to the original-schema CounterFact facts.

    python benchmarks/bench_datasets.py [FILES...] [--tokenizer DIR] [--corpus PATH]
"""

from __future__ import annotations

import argparse
import glob
import time
from collections import Counter
from pathlib import Path

from keyscope._infra.errors import KeyscopeError, SubjectNotFound
from keyscope.data import corpus as corpora
from keyscope.data import datasets as ds
from keyscope.data.perturbations import (
    Probe,
    count_prefix_tokens,
    long_context,
    rephrased_subjects,
    shuffled_subjects,
)
from keyscope.data.prompts import locate

DATA = Path("/work/shared/data")
DEFAULT_FILES = sorted(glob.glob(str(DATA / "counterfact" / "*.json"))) + sorted(
    glob.glob(str(DATA / "paraphrases" / "*.json"))
)
COUNTERFACT = DATA / "counterfact" / "counterfact_orig_format_1400_patil.json"


def show_failures(failures, limit: int) -> None:
    for failure in failures[:limit]:
        print(f"    {failure}")
    if len(failures) > limit:
        print(f"    … and {len(failures) - limit} more")


def perturbations(tokenizer, facts, docs, context_tokens: int, limit: int | None) -> None:
    facts = facts if limit is None else facts[:limit]
    start = time.perf_counter()
    rephrased = [p for f in facts for p in rephrased_subjects(f.prompt, f.subject, f.subject_rephrase)]
    bad = Counter()
    for probe in rephrased:
        try:
            locate(tokenizer, probe.template, probe.subject)
        except SubjectNotFound:
            bad["rephrased subject not located"] += 1
    t_reph = time.perf_counter() - start
    start = time.perf_counter()
    shuffles = [shuffled_subjects(tokenizer, f.prompt, f.subject, n=10) for f in facts]
    t_shuf = time.perf_counter() - start
    start = time.perf_counter()
    contexts: list[Probe] = [long_context(tokenizer, f.prompt, f.subject, docs, n_tokens=context_tokens) for f in facts]
    # re-count independently: the model tokens lying wholly inside the text put before the fact's template
    exact = sum(
        count_prefix_tokens(tokenizer, p.prompt, len(p.template) - len(f.prompt)) == context_tokens
        for p, f in zip(contexts, facts)
    )
    t_ctx = time.perf_counter() - start
    with_subject_rephrase = sum(bool(f.subject_rephrase) for f in facts)
    print(f"  rephrased subjects: {len(rephrased)} probes from {with_subject_rephrase} facts with subject_rephrase"
          f" ({len(rephrased) - bad['rephrased subject not located']} located; {t_reph:.1f} s)")
    print(f"  shuffled subjects:  {sum(map(len, shuffles))} exact-token shuffles; "
          f"{sum(bool(s) for s in shuffles)}/{len(facts)} facts have >= 1 "
          f"({sum(len(s) == 10 for s in shuffles)} have 10; the rest are single-token or have no exact re-tokenising shuffle; {t_shuf:.1f} s)")
    print(f"  long contexts:      {exact}/{len(facts)} with exactly {context_tokens} context tokens ({t_ctx:.1f} s)")


def endless(source):
    """The documents of ``source``, over and over (long_context consumes whole documents)."""
    while True:
        yield from corpora.documents(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=DEFAULT_FILES)
    parser.add_argument("--tokenizer", default=str(DATA / "tokenizer" / "gpt2"))
    parser.add_argument("--corpus", default=str(DATA / "enwiki_extract"), help="long-context text (cycled)")
    parser.add_argument("--context-tokens", type=int, default=300)
    parser.add_argument("--perturb-limit", type=int, help="build perturbations for at most this many facts per file")
    parser.add_argument("--show", type=int, default=10, help="failures shown per file")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    docs = endless(args.corpus)  # one stream: every fact gets fresh context text
    totals = Counter()
    for path in args.files:
        print(f"{path}")
        start = time.perf_counter()
        try:
            schema = ds.sniff_schema(path)
            if schema == ds.PATIL:
                table = ds.load_paraphrases(path)
                n_para = sum(len(v) for v in table.values())
                print(f"  schema {schema}: {len(table)} entries, {n_para} paraphrases "
                      f"({time.perf_counter() - start:.2f} s)")
                if COUNTERFACT.exists():
                    facts = ds.load_facts(COUNTERFACT, on_error="skip")
                    _, matched = ds.attach_paraphrases(facts, table)
                    print(f"  joined to {COUNTERFACT.name}: {matched}/{len(facts)} facts matched")
                continue
            result = ds.read_facts(path)
        except KeyscopeError as exc:
            print(f"  not a fact file: {exc}")
            continue
        t_load = time.perf_counter() - start
        start = time.perf_counter()
        located_failures = ds.locate_subjects(tokenizer, result)
        t_locate = time.perf_counter() - start
        located = len(result.facts) - len(located_failures)
        for key, value in (("records", result.n_records), ("loaded", len(result.facts)), ("located", located)):
            totals[key] += value
        print(f"  schema {result.schema}: {result.n_records} records, {len(result.facts)} loaded "
              f"({t_load:.2f} s), {located} subjects located by the GPT-2 tokenizer ({t_locate:.2f} s)")
        failures = sorted([*result.failures, *located_failures], key=lambda f: f.index)
        print(f"  failures: {len(failures)}")
        show_failures(failures, args.show)
        lenient = sum("subject_given" in f.extras for f in result.facts)
        if lenient:
            print(f"  {lenient} subjects matched only ignoring case/whitespace/apostrophes (kept as written)")
        perturbations(tokenizer, list(result.facts), docs, args.context_tokens, args.perturb_limit)
    print(f"total: {totals['records']} records, {totals['loaded']} loaded, {totals['located']} located")


if __name__ == "__main__":
    main()
