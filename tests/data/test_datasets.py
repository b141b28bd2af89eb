from __future__ import annotations

import json

import pytest

from keyscope._infra.errors import KeyscopeError, MalformedRecord, SubjectNotFound
from keyscope.data import datasets as ds
from keyscope.data.prompts import fill

# ------------------------------------------------------------------------------------------ fixture records

COUNTERFACT = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
    "attribute_prompts": ["Douglas Adams, speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
EASYEDIT = {
    "case_id": 10,
    "prompt": "BBC One, by",
    "target_new": "Sega",
    "subject": "BBC One",
    "ground_truth": "BBC",
    "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
    "locality_prompt": "BBC Radio, by",
    "locality_ground_truth": "BBC",
}
REP = {
    "case_id": 143,
    "prompt": "Microsoft Office Mobile, created by",
    "target_new": "Adobe",
    "target_true": "Microsoft",
    "subject": "Microsoft Office Mobile",
    "rephrase_prompt": ["Microsoft Office Mobile, developed by", "Office Mobile, created by"],
    "rephrase_target": "Adobe",
    "locality_prompt": ["Rich Text Format, developed by", "Xenix was a product of"],
    "locality_ground_truth": "Microsoft",
    "subject_rephrase": [f"alias {i}" for i in range(10)],
}
FACTWORLD = {
    "case_id": 0,
    "relation_id": "continent",
    "prompt": "{} lives on the continent of",
    "subject": "Thismesh Fislend",
    "target_true": "Oceania",
    "target_new": "Antarctica",
    "paraphrase_prompts": ["The home continent of Thismesh Fislend is"],
    "neighborhood_prompts": ["Puzendrous Poukvae resides on the continent of"],
    "locality_ground_truth": "Oceania",
    "subject_rephrase": ["T. Fislend", "Fislend"],
    "subject_rephrase_kind": ["initial", "last"],
    "subject_rephrase_trained": [True, False],
    "similar_subjects": ["Thismesh Vour"],
}
ROME_KNOWN = {
    "known_id": 0,
    "subject": "Vinson Massif",
    "attribute": "Antarctica",
    "template": "{} is located in the continent",
    "prediction": " Antarctica. It is the largest",
    "prompt": "Vinson Massif is located in the continent of",
    "relation_id": "P30",
}


def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize(
    "record,schema",
    [(COUNTERFACT, "counterfact"), (EASYEDIT, "easyedit"), (REP, "rep"), (FACTWORLD, "factworld"),
     (ROME_KNOWN, "rome_known")],
)
def test_schema_detection_and_common_record(tmp_path, record, schema):
    path = write(tmp_path, f"{schema}.json", [record, record])
    assert ds.sniff_schema(path) == schema
    result = ds.read_facts(path)
    assert (result.schema, result.n_records, len(result.facts), result.failures) == (schema, 2, 2, ())
    fact = result.facts[0]
    assert "{}" in fact.prompt and fact.filled_prompt == fill(fact.prompt, fact.subject).text
    assert isinstance(fact.paraphrase_prompts, tuple) and isinstance(fact.subject_rephrase, tuple)
    assert hash(fact) == hash(result.facts[1]) and fact == result.facts[1]


def test_fields_by_role(tmp_path):
    cf = ds.load_facts(write(tmp_path, "cf.json", [COUNTERFACT]))[0]
    assert (cf.prompt, cf.subject, cf.target_new, cf.target_true) == (
        "The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    assert cf.locality_ground_truth == "French" and cf.relation_id == "P103" and cf.subject_rephrase == ()
    assert cf.neighborhood_prompts[0] == "The mother tongue of Léon Blum is"
    assert cf.extras["attribute_prompts"] == ["Douglas Adams, speaker of"] and cf.extras["target_new_id"] == "Q1860"

    ee = ds.load_facts(write(tmp_path, "ee.json", [EASYEDIT]))[0]
    assert (ee.prompt, ee.target_true, ee.target_new) == ("{}, by", "BBC", "Sega")
    assert ee.paraphrase_prompts == (EASYEDIT["rephrase_prompt"],) and ee.neighborhood_prompts == ("BBC Radio, by",)

    rep = ds.load_facts(write(tmp_path, "rep.json", [REP, {**REP, "rephrase_prompt": None}]))
    assert rep[0].prompt == "{}, created by" and len(rep[0].subject_rephrase) == 10
    assert rep[0].paraphrase_prompts == tuple(REP["rephrase_prompt"]) and rep[1].paraphrase_prompts == ()
    assert rep[0].neighborhood_prompts == tuple(REP["locality_prompt"]) and rep[0].extras["rephrase_target"] == "Adobe"

    fw = ds.load_facts(write(tmp_path, "fw.json", [FACTWORLD]))[0]
    assert fw.relation_id == "continent" and fw.extras["subject_rephrase_trained"] == [True, False]

    known = ds.load_facts(write(tmp_path, "known.json", [ROME_KNOWN]))[0]
    assert known.target_new is None and known.target_true == "Antarctica" and known.case_id == 0
    assert known.prompt == "{} is located in the continent of"


def test_jsonl_is_read(tmp_path):
    path = tmp_path / "rep.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [REP, REP]) + "\n")
    assert len(ds.load_facts(path)) == 2


# ------------------------------------------------------------------------------------------ templates


def test_case_mismatch_keeps_the_prompt_text_and_the_given_subject(tmp_path):
    record = {**EASYEDIT, "prompt": "where is the eiffel tower located? In", "subject": "The Eiffel Tower"}
    fact = ds.load_facts(write(tmp_path, "case.json", [record]))[0]
    assert fact.filled_prompt == record["prompt"]
    assert fact.subject == "the eiffel tower" and fact.extras["subject_given"] == "The Eiffel Tower"


def test_subject_absent_is_a_counted_failure_or_a_clear_error(tmp_path):
    path = write(tmp_path, "absent.json", [EASYEDIT, {**EASYEDIT, "subject": "Channel Four"}, EASYEDIT])
    result = ds.read_facts(path)
    assert len(result.facts) == 2 and result.indices == (0, 2)
    (failure,) = result.failures
    assert (failure.index, failure.field, failure.kind) == (1, "prompt", "subject_not_found")
    with pytest.raises(SubjectNotFound) as info:
        ds.load_facts(path)
    assert "record 1" in str(info.value) and "Channel Four" in str(info.value) and "\n" not in str(info.value)
    assert len(ds.load_facts(path, on_error="skip")) == 2


# ------------------------------------------------------------------------------------------ malformed


@pytest.mark.parametrize(
    "records,index,field",
    [
        ([REP, {k: v for k, v in REP.items() if k != "subject"}], 1, "subject"),
        ([REP, REP, {**REP, "target_new": 3}], 2, "target_new"),
        ([REP, {**REP, "locality_prompt": [1, 2]}], 1, "locality_prompt"),
        ([REP, {**REP, "subject": "  "}], 1, "subject"),
        ([COUNTERFACT, {**COUNTERFACT, "requested_rewrite": {**COUNTERFACT["requested_rewrite"], "target_true": {}}}],
         1, "requested_rewrite.target_true"),
        ([COUNTERFACT, {**COUNTERFACT, "requested_rewrite": "oops"}], 1, "requested_rewrite"),
        ([EASYEDIT, {k: v for k, v in EASYEDIT.items() if k != "ground_truth"}], 1, "ground_truth"),
        ([EASYEDIT, "not a record"], 1, None),
    ],
)
def test_malformed_record_names_index_and_field(tmp_path, records, index, field):
    path = write(tmp_path, "bad.json", records)
    with pytest.raises(MalformedRecord) as info:
        ds.load_facts(path)
    message = str(info.value)
    assert f"record {index}" in message and "\n" not in message
    assert info.value.index == index and info.value.field == field
    if field:
        assert repr(field) in message
    result = ds.read_facts(path)
    assert [(f.index, f.field) for f in result.failures] == [(index, field)]


def test_unreadable_and_unknown_files_are_one_line_errors(tmp_path):
    cases = {
        "broken.json": '[{"prompt": "x"',
        "object.json": json.dumps({"description": "x", "mapping": {"1": 2}}),
        "unknown.json": json.dumps([{"question": "q", "answer": "a"}]),
        "empty.json": "[]",
        "scalar.json": "3",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ds.UnknownSchema) as info:
            ds.read_facts(tmp_path / name)
        assert "\n" not in str(info.value) and isinstance(info.value, KeyscopeError), name
    with pytest.raises(ds.UnknownSchema):
        ds.read_facts(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------ tokenizer location


class _DroppingTokenizer:
    """A tokenizer that silently drops the word "Tower" (as a normaliser might): its subject has no token."""

    all_special_ids: list[int] = []
    bos_token_id = None

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids, offsets, pos = [], [], 0
        for word in text.split(" "):
            if word and word != "Tower":
                ids.append(len(word))
                offsets.append((pos, pos + len(word)))
            pos += len(word) + 1
        return {"input_ids": ids, "offset_mapping": offsets}


def test_locate_subjects_reports_record_indices(tmp_path):
    records = [EASYEDIT, {**EASYEDIT, "prompt": "Tower is tall", "subject": "Tower"}, EASYEDIT]
    result = ds.read_facts(write(tmp_path, "ee.json", records))
    failures = ds.locate_subjects(_DroppingTokenizer(), result)
    assert [(f.index, f.field, f.kind) for f in failures] == [(1, "subject", "subject_not_found")]
    assert "Tower" in failures[0].reason


# ------------------------------------------------------------------------------------------ factworld


def test_factworld_source_rebuilds_the_world():
    facts = ds.load_facts("factworld")
    assert len(facts) >= 500 and all("{}" in f.prompt for f in facts[:50])
    assert len({f.subject for f in facts}) >= 500 and all(len(f.subject_rephrase) == 10 for f in facts[:50])
    assert ds.read_facts("factworld").schema == "factworld"


def test_factworld_source_follows_the_model_card(tmp_path, monkeypatch):
    import keyscope.factworld

    card = {"name": "factworld", "train_config": {"seed": 3, "world": {"seed": 3, "n_subjects": 60}}}
    (tmp_path / "keyscope.json").write_text(json.dumps(card))
    monkeypatch.setattr(keyscope.factworld, "shipped_model_dir", lambda: tmp_path)
    facts = ds.load_facts("factworld")
    assert len({f.subject for f in facts}) == 60


# ------------------------------------------------------------------------------------------ Patil paraphrases


def test_patil_paraphrases_attach_by_filled_prompt_and_true_target(tmp_path):
    table = {
        "The mother tongue of Danielle Darrieux is French": ["Darrieux’s mother tongue is", "Danielle Darrieux, a native"],
        "Something else entirely is X": ["nope"],
    }
    path = write(tmp_path, "patil.json", table)
    assert ds.sniff_schema(path) == ds.PATIL
    with pytest.raises(ds.UnknownSchema):
        ds.read_facts(path)
    loaded = ds.load_paraphrases(path)
    facts = ds.load_facts(write(tmp_path, "cf.json", [COUNTERFACT, {**COUNTERFACT, "case_id": 1,
                                "requested_rewrite": {**COUNTERFACT["requested_rewrite"], "subject": "Léon Blum"}}]))
    joined, matched = ds.attach_paraphrases(facts, loaded)
    assert matched == 1
    assert joined[0].paraphrase_prompts == (*COUNTERFACT["paraphrase_prompts"], "Darrieux’s mother tongue is")
    assert joined[1] == facts[1]
    (tmp_path / "bad.json").write_text(json.dumps({"k": "not a list"}))
    with pytest.raises(MalformedRecord):
        ds.load_paraphrases(tmp_path / "bad.json")


def test_several_files_read_as_one_with_each_case_id_once(tmp_path):
    """``a.json,b.json`` reads both files' records in order; a case id of ``a`` met again in ``b`` is counted as
    a duplicate and its later fact left out; files of two schemas are one line."""
    other = {**REP, "case_id": 7, "prompt": "Xenix, created by", "subject": "Xenix"}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([REP, {"case_id": 9, "prompt": "no subject"}]))
    second.write_text(json.dumps([{**REP, "locality_prompt": ["another"]}, other]))
    both = ds.read_facts(f"{first},{second}")
    assert both.schema == ds.REP and both.n_records == 4 and both.duplicates == 1
    assert [f.case_id for f in both.facts] == [143, 7]
    assert both.facts[0].neighborhood_prompts == tuple(REP["locality_prompt"])  # the first file's copy
    assert both.indices == (0, 3) and [f.index for f in both.failures] == [1]
    renumbered = tmp_path / "c.json"  # the same case id for another fact: files numbered apart
    renumbered.write_text(json.dumps([{**REP, "target_new": "Apple"}]))
    with pytest.raises(ds.UnknownSchema, match="case id 143 names different facts"):
        ds.read_facts(f"{first},{renumbered}")
    unnumbered = tmp_path / "d.json"
    unnumbered.write_text(json.dumps([{k: v for k, v in other.items() if k != "case_id"}]))
    with pytest.raises(ds.UnknownSchema, match="has no case_id"):
        ds.read_facts(f"{first},{unnumbered}")
    assert ds.fact_records(both, [1]) == [other]
    assert ds.sniff_schema(f"{first}, {second}") == ds.REP
    assert [f.case_id for f in ds.load_facts(f"{first},{second}", on_error="skip")] == [143, 7]
    easy = tmp_path / "e.json"
    easy.write_text(json.dumps([EASYEDIT]))
    with pytest.raises(ds.UnknownSchema, match="share a schema"):
        ds.read_facts(f"{first},{easy}")
    with pytest.raises(ds.UnknownSchema, match="does not exist"):
        ds.read_facts(f"{first},{tmp_path / 'missing.json'}")
    with pytest.raises(ds.UnknownSchema, match="empty file name"):
        ds.read_facts(f"{first},")
