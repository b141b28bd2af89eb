from __future__ import annotations

import json

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
    assert json.loads(out.read_text()) == {"schema": "rep", "records": 2, "loaded": 2, "located": 2, "failures": []}


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
