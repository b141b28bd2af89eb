from __future__ import annotations

import json
from pathlib import Path

import pytest

from keyscope.cli import main
from tests import hf_tiny

REP = {
    "case_id": 1,
    "prompt": "The Eiffel Tower is located in",
    "target_new": "Rome",
    "target_true": "Paris",
    "subject": "The Eiffel Tower",
    "rephrase_prompt": ["The Eiffel Tower can be found in"],
    "locality_prompt": ["Ljubljana is located in"],
    "locality_ground_truth": "Slovenia",
    "subject_rephrase": ["Eiffel Tower", "the Tower"],
}


def write(tmp_path, name, records) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "bpe"
    hf_tiny.byte_level_bpe_tokenizer().save_pretrained(path)
    return str(path)


def test_clean_file_exits_0_and_reports(tmp_path, capsys, tokenizer_dir):
    path = write(tmp_path, "rep.json", [REP, {**REP, "case_id": 2, "subject": "Eiffel Tower"}])
    out = tmp_path / "report.json"
    assert main(["data", path, "--tokenizer", tokenizer_dir, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "schema: rep" in printed and "records: 2" in printed and "loaded: 2" in printed
    assert "located: 2 (by the tokenizer" in printed and "failures: 0" in printed
    assert json.loads(out.read_text()) == {"schema": "rep", "records": 2, "loaded": 2, "duplicates": 0, "located": 2,
                                          "failures": []}


def test_without_tokenizer_locates_by_characters(tmp_path, capsys):
    assert main(["data", write(tmp_path, "rep.json", [REP])]) == 0
    assert "located: 1 (by characters only" in capsys.readouterr().out


def test_with_a_model_tokenizer(tmp_path, capsys, tiny_checkpoints):
    assert main(["data", write(tmp_path, "rep.json", [REP]), "--model", str(tiny_checkpoints["gpt2"])]) == 0
    assert "located: 1 (by the tokenizer of" in capsys.readouterr().out


def test_failures_exit_1_with_index_and_reason(tmp_path, capsys, tokenizer_dir):
    records = [REP, {k: v for k, v in REP.items() if k != "target_true"}, {**REP, "subject": "Big Ben"}, REP]
    out = tmp_path / "report.json"
    assert main(["data", write(tmp_path, "bad.json", records), "--tokenizer", tokenizer_dir, "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "records: 4" in printed and "loaded: 2" in printed and "failures: 2" in printed
    assert "record 1, field 'target_true': missing" in printed
    assert "record 2, field 'prompt'" in printed and "Big Ben" in printed
    report = json.loads(out.read_text())
    assert [(f["index"], f["field"], f["kind"]) for f in report["failures"]] == [
        (1, "target_true", "malformed"), (2, "prompt", "subject_not_found")]
    assert report["located"] == 2


@pytest.mark.parametrize(
    "name,text",
    [("broken.json", '[{"prompt": "x", '), ("unknown.json", '[{"question": "q"}]'), ("empty.json", "[]")],
)
def test_unreadable_or_unknown_file_is_one_line_exit_2(tmp_path, capsys, name, text):
    (tmp_path / name).write_text(text)
    assert main(["data", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and "\n" not in err


def test_missing_file_and_bad_tokenizer_are_one_line(tmp_path, capsys):
    assert main(["data", str(tmp_path / "nope.json")]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
    assert main(["data", write(tmp_path, "rep.json", [REP]), "--tokenizer", str(tmp_path / "no-tokenizer")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error: cannot load a tokenizer") and "\n" not in err


def test_patil_table_is_recognised(tmp_path, capsys):
    path = write(tmp_path, "patil.json", {"The Eiffel Tower is located in Paris": ["Eiffel Tower, located in"]})
    assert main(["data", path]) == 0
    printed = capsys.readouterr().out
    assert "schema: patil_paraphrases" in printed and "records: 1" in printed


# ---------------------------------------------------------------------------------------------- --known

FACTWORLD_DATA = Path(__file__).resolve().parents[2] / "data" / "factworld" / "factworld.json"
UNKNOWN = {0, 6, 7, 8, 9, 10, 11}  # facts made unknown: target_true replaced by target_new
NO_CASE_ID = {13, 14}  # records whose case id is their index in the file


@pytest.fixture(scope="module")
def factworld_model():
    from keyscope.model.models import load_model

    return load_model("factworld")


@pytest.fixture
def mixed_facts(tmp_path, monkeypatch):
    """``(path, records)``: 18 factworld facts of three subjects (six each), of which the model knows all but
    :data:`UNKNOWN` (every fact of the second subject and the first fact of the first), written as a file."""
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    records = json.loads(FACTWORLD_DATA.read_text())[:18]
    for record in records:
        if record["case_id"] in UNKNOWN:
            record["target_true"] = record["target_new"]
    records = [{k: v for k, v in r.items() if k != "case_id"} if r["case_id"] in NO_CASE_ID else r for r in records]
    return write(tmp_path, "mixed.json", records), records


def _known_ids(model, path) -> list:
    """The case ids of the facts of ``path`` that ``model`` predicts top-1, computed fact by fact."""
    from keyscope.analysis.predictions import predicts_target
    from keyscope.data.datasets import load_facts

    return [f.case_id for f in load_facts(path) if predicts_target(model, [f], batch_size=1).item()]


def test_known_counts_the_facts_the_model_predicts_and_writes_their_records(mixed_facts, factworld_model, tmp_path,
                                                                            capsys):
    from keyscope.data.datasets import load_facts

    path, records = mixed_facts
    subset, report = tmp_path / "out" / "known.json", tmp_path / "report.json"
    argv = ["data", path, "--model", "factworld", "--known", "--write-known", str(subset), "--json", str(report),
            "--no-progress"]
    assert main(argv) == 0
    expected = _known_ids(factworld_model, path)
    assert expected and not UNKNOWN & set(expected)  # the file's premise: the altered facts are not known
    result = json.loads(report.read_text())
    assert result["records"] == result["loaded"] == 18 and result["not_judged"] == 0
    assert result["known"] == len(expected) and result["known_case_ids"] == expected
    printed = capsys.readouterr().out
    assert f"known: {len(expected)} of 18 judged" in printed and f"wrote {subset}" in printed
    written = json.loads(subset.read_text())  # the original records, a missing case id written in
    by_id = {r.get("case_id", i): r for i, r in enumerate(records)}
    assert written == [{"case_id": i, **by_id[i]} if i in NO_CASE_ID else by_id[i] for i in expected]
    assert [f.case_id for f in load_facts(subset)] == expected
    assert load_facts(subset) == [f for f in load_facts(path) if f.case_id in expected]


@pytest.mark.parametrize("extra", [["--known"], ["--write-known", "known.json"], ["--known", "--tokenizer", "tok"]])
def test_known_without_a_model_is_one_line_exit_2(tmp_path, capsys, extra):
    extra = [str(tmp_path / e) if e.endswith(".json") or e == "tok" else e for e in extra]
    assert main(["data", write(tmp_path, "rep.json", [REP]), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error: --") and "needs --model" in err and "\n" not in err
    assert not (tmp_path / "known.json").exists()


def test_write_known_is_checked_before_work_and_removed_after_a_failure(mixed_facts, tmp_path, capsys, monkeypatch):
    path, _ = mixed_facts
    assert main(["data", path, "--model", "factworld", "--write-known", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"keyscope: error: --write-known {tmp_path} is a folder; give a file path"

    from keyscope.cli import data

    def failing(path, payload):  # the report fails after the known facts are written
        if isinstance(payload, dict):
            raise OSError(28, "No space left on device", path)
        write_json(path, payload)

    write_json = data.write_json
    monkeypatch.setattr(data, "write_json", failing)
    subset = tmp_path / "new" / "known.json"
    argv = ["data", path, "--model", "factworld", "--write-known", str(subset), "--json", str(tmp_path / "r.json"),
            "--no-progress"]
    assert main(argv) == 2
    assert "No space left" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_known_on_a_paraphrase_table_is_one_line(tmp_path, capsys):
    path = write(tmp_path, "patil.json", {"The Eiffel Tower is located in Paris": ["Eiffel Tower, located in"]})
    assert main(["data", path, "--model", "factworld", "--known"]) == 2
    assert "paraphrase table" in capsys.readouterr().err


def test_scan_with_known_studies_only_known_facts(mixed_facts, factworld_model, tmp_path):
    from keyscope.data.datasets import load_facts
    from keyscope.studies.scan import distinct_subjects

    path, _ = mixed_facts
    base = ["scan", "--data", path, "--scan-tokens", "300", "--cov-tokens", "400", "--seq-len", "32", "--batch-size", "4",
            "--n-subjects", "5", "--out", str(tmp_path / "out"), "--no-progress"]
    studied = {}
    for known in (False, True):
        report = tmp_path / f"scan_{known}.json"
        assert main(base + ["--json", str(report)] + (["--known"] if known else [])) == 0
        studied[known] = [t["case_id"] for t in json.loads(report.read_text())["top1"]["strict"]]
    facts = load_facts(path)
    expected = set(_known_ids(factworld_model, path))
    assert studied[False] == [f.case_id for f in distinct_subjects(facts, 5)] == [0, 6, 12]
    assert studied[True] == [f.case_id for f in distinct_subjects([f for f in facts if f.case_id in expected], 5)]
    assert studied[True] == [1, 12]


@pytest.mark.parametrize("command", ["edit", "reach"])
def test_edit_and_reach_with_known_refuse_a_case_the_model_does_not_know(mixed_facts, tmp_path, capsys, command):
    path, _ = mixed_facts
    argv = [command, "--data", path, "--case", "0", "--no-progress", "--json", str(tmp_path / "r.json")]
    if command == "reach":
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv + ["--known"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error: --known: the model does not know case 0") and "\n" not in err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "out").exists()


def test_similarity_with_known_looks_for_the_pca_subject_among_known_facts(mixed_facts, tmp_path, capsys):
    path, _ = mixed_facts
    argv = ["similarity", "--data", path, "--pca-subject", "Nathheik Keimfin Grouldril", "--no-progress", "--out",
            str(tmp_path / "out")]
    assert main(argv + ["--known"]) == 2  # every fact of that subject is unknown
    err = capsys.readouterr().err.strip()
    assert err == (f"keyscope: error: --pca-subject 'Nathheik Keimfin Grouldril' is not a subject of the facts of "
                   f"{path} the model knows (--known)")


@pytest.mark.parametrize("command", ["trace", "values", "evaluate", "bounds", "sequential"])
def test_known_is_always_on_where_a_command_draws_known_facts(command):
    from keyscope.cli import build_parser
    from keyscope.cli.common import ALWAYS_KNOWN_HELP

    parser = build_parser()
    assert parser.parse_args([command, "--known"]).known and not parser.parse_args([command]).known
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert next(a for a in sub._actions if a.dest == "known").help == ALWAYS_KNOWN_HELP


def test_reproduce_report_names_known_in_its_command_line():
    from keyscope.studies import reproduce

    figures = Path(__file__).resolve().parents[2] / "figures"
    run = json.loads((figures / "reproduce_timings.json").read_text())
    assert "reproduce --model factworld --out figures`" in reproduce.report(figures, run)  # a committed run: no --known
    known = reproduce.report(figures, {**run, "config": {**run["config"], "known": True}})
    assert "reproduce --model factworld --known --out figures`" in known


def test_several_files_report_the_duplicates_left_out(tmp_path, capsys):
    first = write(tmp_path, "a.json", [REP])
    second = write(tmp_path, "b.json", [REP, {**REP, "case_id": 2}])
    out = tmp_path / "report.json"
    assert main(["data", f"{first},{second}", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["records"], report["loaded"], report["duplicates"]) == (3, 2, 1)
    assert "1 case ids already read from an earlier file left out" in capsys.readouterr().out
