"""Bad input, tried as a new user would (issue #17): every case ends in exit status 2 and exactly one
``keyscope: error: …`` line on stderr — no traceback, no usage block — and leaves nothing in ``--out``;
``keyscope data`` counts bad records as failures (exit 1); warnings are one ``keyscope: warning: …`` line.

Every command runs in-process (``keyscope.cli.main``) on tiny local models; a case fails before the work it
guards, so the whole catalogue takes seconds. The Python API's cases (a request dict without ``target_new``,
``REP.fit`` keys of the wrong type, width or emptiness, an unfitted adaptor, an ``<unk>`` target) are in
``tests/editing/test_rome.py`` and ``tests/editing/test_rep.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from keyscope._infra import cache
from keyscope.analysis.covariance import KIND, load_or_compute_covariance
from keyscope.cli import main
from keyscope.model.models import load_model
from tests import hf_tiny

#: Facts the tiny models' tokenizers read (the words are in hf_tiny.TRAINING_TEXT).
FACTS = [
    {"case_id": 7, "prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "rephrase_prompt": None, "locality_prompt": [], "locality_ground_truth": "Paris",
     "subject_rephrase": ["Eiffel Tower"]},
    {"case_id": 8, "prompt": "Michael Jordan played basketball for the", "subject": "Michael Jordan",
     "target_new": "Lakers", "target_true": "Bulls", "rephrase_prompt": None, "locality_prompt": [],
     "locality_ground_truth": "Bulls", "subject_rephrase": ["Jordan"]},
]
#: Characters outside the tiny LLaMA tokenizer's vocabulary (a BPE without byte fallback): they become <unk>.
UNKNOWN = "Жюль Ёж"


def error_line(capsys) -> str:
    """The one stderr line of a failed command (asserting there is exactly one, and no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("keyscope: error: "), lines[0]
    return lines[0]


def fails(capsys, argv: list[str], *messages: str, out: Path | None = None) -> str:
    """Run ``argv``: exit 2, one error line holding every one of ``messages``, nothing in ``out``."""
    assert main(argv) == 2, argv
    line = error_line(capsys)
    assert all(m in line for m in messages), (line, messages)
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    return line


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_checkpoints):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("KEYSCOPE_CACHE", str(cache_dir))
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(hf_tiny.TRAINING_TEXT * 3), encoding="utf-8")
    afile = tmp_path / "afile"
    afile.write_text("x")
    llama = str(tiny_checkpoints["llama"])
    return {"tmp": tmp_path, "cache": cache_dir, "facts": str(facts), "corpus": str(corpus), "afile": afile,
            "llama": llama, "out": tmp_path / "out",
            "model": ["--model", llama, "--layer", "1", "--data", str(facts), "--corpus", str(corpus), "--no-progress"]}


def cached_files(env) -> list[Path]:
    return sorted(env["cache"].rglob("*.safetensors")) if env["cache"].exists() else []


# ---------------------------------------------------------------------------------------------- output paths

#: Every command that writes into --out, as the cheapest line that would run it.
OUT_COMMANDS = [["similarity"], ["trace"], ["scan"], ["values"], ["evaluate"], ["bounds"], ["reproduce"],
                ["factworld", "train"]]
JSON_COMMANDS = [*OUT_COMMANDS, ["data", "factworld"], ["edit", "--case", "0"], ["factworld", "info"]]


@pytest.mark.parametrize("command", OUT_COMMANDS, ids=" ".join)
def test_out_naming_a_file_fails_before_any_work(env, capsys, command):
    fails(capsys, [*command, "--out", str(env["afile"])], "--out", "is a file")
    assert env["afile"].read_text() == "x"


@pytest.mark.parametrize("command", JSON_COMMANDS, ids=" ".join)
def test_json_naming_a_folder_fails_before_any_work(env, capsys, command):
    fails(capsys, [*command, "--json", str(env["tmp"])], "--json", "is a folder")


@pytest.mark.parametrize("command", [["similarity"], ["data", "factworld"], ["edit", "--case", "0"]], ids=" ".join)
def test_json_under_a_regular_file_fails_before_any_work(env, capsys, command):
    fails(capsys, [*command, "--json", str(env["afile"] / "report.json")], "--json", "is not a folder")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc file system")
def test_json_and_out_in_an_unwritable_place_fail_before_any_work(env, capsys):
    # /proc takes no new files, not even from root (for whom os.access says yes everywhere)
    fails(capsys, ["similarity", "--json", "/proc/keyscope-test/report.json"], "--json", "cannot write")
    fails(capsys, ["trace", "--out", "/proc/keyscope-test"], "--out", "cannot write")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_a_read_only_folder_fails_before_any_work(env, capsys):
    locked = env["tmp"] / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        fails(capsys, ["similarity", "--out", str(locked / "figs")], "--out", "not writable")
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------------------------------- counts

COUNTS = [
    (["similarity", "--n-subjects", "0"], "--n-subjects"),
    (["similarity", "--n-subjects", "-3"], "--n-subjects"),
    (["similarity", "--tokens", "0"], "--tokens"),
    (["similarity", "--cov-tokens", "0"], "--cov-tokens"),
    (["scan", "--subjects", "-2"], "--subjects"),
    (["scan", "--n-subjects", "0"], "--n-subjects"),
    (["scan", "--top-k", "0"], "--top-k"),
    (["scan", "--tokens", "-1"], "--tokens"),
    (["scan", "--scan-tokens", "0"], "--scan-tokens"),
    (["scan", "--cov-tokens", "0"], "--cov-tokens"),
    (["scan", "--window", "-1"], "--window"),
    (["scan", "--seq-len", "0"], "--seq-len"),
    (["scan", "--batch-size", "0"], "--batch-size"),
    (["reach", "--top", "0"], "--top"),
    (["reach", "--tokens", "0"], "--tokens"),
    (["reach", "--mask-window", "-1"], "--mask-window"),
    (["trace", "--n", "0"], "--n"),
    (["trace", "--samples", "0"], "--samples"),
    (["trace", "--window", "0"], "--window"),
    (["trace", "--n", "ten"], "--n"),
    (["edit", "--tokens", "0"], "--tokens"),
    (["edit", "--shuffles", "-1"], "--shuffles"),
    (["edit", "--context-tokens", "-5"], "--context-tokens"),
    (["values", "--n", "0"], "--n"),
    (["values", "--tokens", "0"], "--tokens"),
    (["evaluate", "--n", "-1"], "--n/--n-facts"), (["evaluate", "--n-facts", "0"], "--n/--n-facts"),
    (["evaluate", "--tokens", "1.5"], "--tokens"),
    (["bounds", "--n", "0"], "--n"),
    (["bounds", "--scan-tokens", "0"], "--scan-tokens"),
    (["covariance", "--tokens", "0"], "--tokens"),
    (["reproduce", "--scan-tokens", "0"], "--scan-tokens"),
]


@pytest.mark.parametrize("argv, flag", COUNTS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_counts_are_checked_by_the_parser_naming_the_flag(env, capsys, argv, flag):
    line = fails(capsys, [*argv, "--out", str(env["out"])], f"argument {flag}:", out=env["out"])
    assert "--help" in line


@pytest.mark.parametrize("argv", [["bogus"], ["trace", "--no-such-option"], ["factworld"]], ids=repr)
def test_usage_errors_are_one_line(capsys, argv):
    fails(capsys, argv)


@pytest.mark.parametrize("command", [["similarity"], ["data", "factworld"], ["trace"], ["scan"], ["edit"],
                                     ["values"], ["evaluate"], ["bounds"], ["reproduce"], ["factworld", "info"],
                                     ["factworld", "train"]], ids=" ".join)
def test_every_command_takes_no_progress(command):
    from keyscope.cli import build_parser

    assert build_parser().parse_args([*command, "--no-progress"]).no_progress is True


def test_the_library_refuses_counts_below_one_too():
    from keyscope._infra.errors import KeyscopeError
    from keyscope.studies import scan, similarity

    facts = [SimpleNamespace(subject=f["subject"]) for f in FACTS]
    for n in (0, -3):
        with pytest.raises(KeyscopeError, match="at least 1"):
            similarity.pick_facts(facts, n, seed=0)
        with pytest.raises(KeyscopeError, match="at least 1"):
            scan.distinct_subjects(facts, n)


# ---------------------------------------------------------------------------------------------- named things

def test_an_unknown_pca_subject_fails_before_the_model_loads(env, capsys):
    fails(capsys, ["similarity", *env["model"], "--pca-subject", "Nobody", "--out", str(env["out"])],
          "--pca-subject 'Nobody'", out=env["out"])
    assert not cached_files(env)


@pytest.mark.parametrize("command", [["trace"], ["edit"]], ids=" ".join)
def test_an_unknown_case_fails_before_the_work(env, capsys, command):
    out = ["--out", str(env["out"])] if command == ["trace"] else ["--json", str(env["out"] / "e.json")]
    fails(capsys, [*command, "--data", env["facts"], "--case", "nope", *out], "'nope'", out=env["out"])


# ---------------------------------------------------------------------------------------------- prompts and tokens

def test_a_prompt_with_two_subject_slots_is_refused(env, capsys):
    json_path = env["out"] / "edit.json"
    fails(capsys, ["edit", *env["model"], "--subject", "The Eiffel Tower", "--prompt", "{} is as tall as {}",
                   "--target", "Rome", "--json", str(json_path)], "2 subject slots", out=env["out"])
    two = env["tmp"] / "two.json"
    two.write_text(json.dumps([{**FACTS[0], "prompt": "{} is as tall as {}"}]))
    fails(capsys, ["similarity", "--model", env["llama"], "--data", str(two), "--out", str(env["out"])],
          "2 subject slots", out=env["out"])


def test_an_edit_toward_an_unknown_token_is_refused_before_c(env, capsys):
    json_path = env["out"] / "edit.json"
    fails(capsys, ["edit", *env["model"], "--subject", "The Eiffel Tower", "--prompt", "{} is located in",
                   "--target", UNKNOWN, "--json", str(json_path)], "target", "unknown token", repr(UNKNOWN),
          out=env["out"])
    assert not cached_files(env)


def test_an_edit_of_an_unknown_subject_is_refused_before_c(env, capsys):
    fails(capsys, ["edit", *env["model"], "--subject", UNKNOWN, "--prompt", "{} is located in", "--target", "Rome"],
          "subject", "unknown token", repr(UNKNOWN))
    assert not cached_files(env)


@pytest.mark.parametrize("command", [["similarity", "--n-subjects", "2"], ["scan", "--n-subjects", "2"]], ids=" ".join)
def test_studying_unknown_subjects_is_refused_before_c(env, capsys, command):
    unknown = env["tmp"] / "unknown.json"
    unknown.write_text(json.dumps([FACTS[0], {**FACTS[1], "prompt": "{} played basketball for the",
                                              "subject": UNKNOWN}]))
    argv = [*command, *env["model"], "--out", str(env["out"])]
    argv[argv.index("--data") + 1] = str(unknown)
    fails(capsys, argv, repr(UNKNOWN), "case 8", "unknown token", out=env["out"])
    assert not cached_files(env)


def test_data_counts_unknown_tokens_and_two_slots_as_failures(env, capsys):
    records = [FACTS[0], {**FACTS[1], "prompt": "{} played for the", "subject": UNKNOWN},
               {**FACTS[0], "case_id": 9, "target_new": "Ёлка"}, {**FACTS[0], "case_id": 10, "prompt": "{} and {}"}]
    path = env["tmp"] / "mixed.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    report = env["tmp"] / "report.json"
    assert main(["data", str(path), "--model", env["llama"], "--json", str(report)]) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    failures = json.loads(report.read_text())["failures"]
    assert [(f["index"], f["field"], f["kind"]) for f in failures] == [
        (1, "subject", "unknown_token"), (2, "target_new", "unknown_token"), (3, "prompt", "malformed")]
    assert repr(UNKNOWN) in captured.out and "'Ёлка'" in captured.out and "located: 1 " in captured.out


# ---------------------------------------------------------------------------------------------- corpora

def corpus_case(env, capsys, corpus: Path, *messages: str) -> None:
    argv = ["similarity", *env["model"], "--cov-tokens", "300", "--out", str(env["out"]), "--json",
            str(env["tmp"] / "sim.json")]
    argv[argv.index("--corpus") + 1] = str(corpus)
    fails(capsys, argv, *messages, out=env["out"])
    assert not cached_files(env) and not (env["tmp"] / "sim.json").exists()


def test_a_binary_corpus_is_refused_and_not_cached(env, capsys):
    blob = env["tmp"] / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 64)
    corpus_case(env, capsys, blob, "blob.bin is binary")


def test_a_corpus_of_unknown_tokens_is_refused_and_not_cached(env, capsys):
    foreign = env["tmp"] / "foreign.txt"
    foreign.write_text("\n\n".join(f"{UNKNOWN} Ёлка Щука Дом Чай" for _ in range(100)), encoding="utf-8")
    corpus_case(env, capsys, foreign, "unknown token")


def test_a_nearly_empty_corpus_is_refused_and_not_cached(env, capsys):
    tiny = env["tmp"] / "tiny.txt"
    tiny.write_text("Paris is big.")
    corpus_case(env, capsys, tiny, "only", "of the 300 tokens")


# ---------------------------------------------------------------------------------------------- failures after work

def similarity_argv(env) -> list[str]:
    return ["similarity", *env["model"], "--cov-tokens", "200", "--n-subjects", "1", "--out", str(env["out"]),
            "--json", str(env["out"] / "sim.json")]


@pytest.mark.parametrize("exc, code, message", [
    (OSError(28, "No space left on device", "sim.json"), 2, "keyscope: error: sim.json: No space left on device"),
    (KeyboardInterrupt(), 130, "keyscope: interrupted"),
])
def test_a_failure_after_the_work_leaves_nothing_behind(env, capsys, monkeypatch, exc, code, message):
    import keyscope.cli.similarity as command

    written = command.write_json

    def broken(path, payload):
        written(path, payload)
        raise exc

    monkeypatch.setattr(command, "write_json", broken)  # fails after the figures, CSV and JSON are written
    assert main(similarity_argv(env)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [message] and not env["out"].exists()

    env["out"].mkdir()  # an existing --out: what was there stays as it was, what the run added goes
    before = {"mine.txt": b"keep", "fig3_similarity.png": b"an older figure", "sim.json": b'{"older": 1}'}
    for name, content in before.items():
        (env["out"] / name).write_bytes(content)
    assert main(similarity_argv(env)) == code
    assert {p.name: p.read_bytes() for p in env["out"].iterdir()} == before  # overwritten ones put back
    assert not list(env["tmp"].rglob("*.tmp")) and not list(env["tmp"].rglob(".keyscope-backup-*"))

    monkeypatch.setattr(command, "write_json", written)  # the same run succeeding replaces them
    assert main(similarity_argv(env)) == 0
    assert (env["out"] / "fig3_similarity.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((env["out"] / "sim.json").read_text())["layer"] == 1
    assert (env["out"] / "mine.txt").read_bytes() == b"keep" and not list(env["tmp"].rglob(".keyscope-backup-*"))


def test_a_corrupt_cache_is_recomputed_with_one_warning_line(env, capsys):
    model = load_model(env["llama"])
    load_or_compute_covariance(model, 1, env["corpus"], n_tokens=200, progress=False)  # as the command caches C
    (tensors,) = cached_files(env)
    tensors.write_bytes(tensors.read_bytes()[:-8])
    assert main(similarity_argv(env)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keyscope: warning: cached key_covariance") and "recomputing" in err[0]
    assert cache.load(KIND, json.loads((tensors.parent / cache.SPEC).read_text())["spec"])  # rewritten, valid

