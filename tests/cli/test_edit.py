from __future__ import annotations

import json

import pytest
import torch

from keyscope.cli import main
from keyscope.model.models import load_model

FACTS = [
    {"case_id": 7, "prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "rephrase_prompt": None, "locality_prompt": [], "locality_ground_truth": "Paris",
     "subject_rephrase": ["Eiffel Tower", "the Tower"]},
    {"case_id": 8, "prompt": "Michael Jordan played basketball for the", "subject": "Michael Jordan",
     "target_new": "Lakers", "target_true": "Bulls", "rephrase_prompt": None, "locality_prompt": [],
     "locality_ground_truth": "Bulls", "subject_rephrase": ["Jordan", "MJ", "Air Jordan"]},
]

REPORT_KEYS = {"model", "layer", "case_id", "request", "seconds", "v_star", "probes"}


@pytest.fixture
def inputs(tmp_path, tiny_checkpoints, cli_files):
    facts, corpus = cli_files(FACTS)
    base = ["edit", "--model", str(tiny_checkpoints["llama"]), "--layer", "1", "--corpus", str(corpus),
            "--cov-tokens", "500", "--no-progress"]
    return {"base": base, "facts": str(facts), "tmp": tmp_path}


def test_edit_a_case_shows_every_probe_before_and_after(inputs, capsys, tiny_checkpoints):
    report = inputs["tmp"] / "edit.json"
    argv = inputs["base"] + ["--data", inputs["facts"], "--case", "8", "--shuffles", "3", "--context-tokens", "40",
                             "--json", str(report)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert set(result) == REPORT_KEYS and result["case_id"] == 8 and result["layer"] == 1
    assert result["request"] == {"prompt": "{} played basketball for the", "subject": "Michael Jordan",
                                 "target_new": "Lakers", "target_true": "Bulls"}
    assert set(result["seconds"]) == {"prefixes", "k_star", "v_star", "update", "total"}
    assert all(t >= 0 for t in result["seconds"].values()) and result["seconds"]["v_star"] > 0
    kinds = [p["kind"] for p in result["probes"]]
    assert kinds[0] == "original" and kinds.count("rephrase") == 3 and kinds[-1] == "long"
    assert 1 <= kinds.count("shuffle") <= 3  # two subject tokens or more: at least one shuffle
    assert kinds.count("shuffle_words") == 1  # two words: one other order
    for probe in result["probes"]:
        assert len(probe["before"]) == len(probe["after"]) == 3
        assert probe["before"][0]["probability"] >= probe["before"][1]["probability"] >= probe["before"][2]["probability"]
        assert 0 <= probe["target_probability_before"] <= 1 and 0 <= probe["target_probability_after"] <= 1
        assert isinstance(probe["strength"], float)
    long = result["probes"][-1]
    assert long["n_context_tokens"] == 40 and long["prompt"].endswith("Michael Jordan played basketball for the")
    # s(k) of the bare prompt against the prefix-averaged k*: the edit reaches it
    assert result["probes"][0]["strength"] > 0.5
    assert "[original]" in printed and "[rephrase]" in printed and "[long]" in printed
    # the predictions before the edit, recomputed with one plain forward pass per probe
    model = load_model(str(tiny_checkpoints["llama"]))
    for probe in result["probes"]:
        context = model.tokenizer(probe["prompt"])["input_ids"]
        with_target = model.tokenizer(probe["prompt"] + " Lakers")["input_ids"]
        assert with_target[: len(context)] == context
        with torch.no_grad():
            p = model(torch.tensor([context]), return_type="logits")[0, -1].softmax(-1)  # (vocab,)
        top = p.topk(3)
        assert probe["target_probability_before"] == pytest.approx(float(p[with_target[len(context)]]), rel=1e-4)
        assert [b["probability"] for b in probe["before"]] == pytest.approx(top.values.tolist(), rel=1e-4)
        assert [b["token"] for b in probe["before"]] == [model.tokenizer.decode([t]) for t in top.indices.tolist()]
    original = result["probes"][0]
    assert original["target_probability_after"] > original["target_probability_before"]  # the edit moved it
    assert printed.count("before:") == len(kinds) and printed.count("after:") == len(kinds)
    assert "k*" in printed and "v*" in printed and "update" in printed


def test_edit_from_arguments_has_no_rephrasings(inputs, capsys):
    argv = inputs["base"] + ["--subject", "The Eiffel Tower", "--prompt", "{} is located in", "--target", "Rome",
                             "--shuffles", "0", "--context-tokens", "0", "--json", str(inputs["tmp"] / "e.json")]
    assert main(argv) == 0
    result = json.loads((inputs["tmp"] / "e.json").read_text())
    assert [p["kind"] for p in result["probes"]] == ["original"]
    assert result["case_id"] is None and result["request"]["target_true"] is None
    assert "'The Eiffel Tower is located in' -> 'Rome'" in capsys.readouterr().out


def test_edit_shows_the_v_star_optimisation_with_progress_only(inputs, capsys):
    """Progress bars on a terminal only (stderr captured here is none), unless ``--progress`` forces them."""
    argv = [a for a in inputs["base"] if a != "--no-progress"] + [
        "--subject", "The Eiffel Tower", "--prompt", "{} is located in", "--target", "Rome", "--shuffles", "0",
        "--context-tokens", "0"]
    assert main(argv + ["--progress"]) == 0
    assert "v* layer 1" in capsys.readouterr().err
    assert main(argv) == 0
    assert "v* layer" not in capsys.readouterr().err
    assert main(argv + ["--no-progress"]) == 0
    assert "v* layer" not in capsys.readouterr().err


def _target_probability(model, prompt: str, target: str) -> float:
    """P(first token of `` target`` | ``prompt``) under ``model``."""
    context = model.tokenizer(prompt)["input_ids"]
    token = model.tokenizer(prompt + " " + target)["input_ids"][len(context)]
    with torch.no_grad():
        return float(model(torch.tensor([context]), return_type="logits")[0, -1].softmax(-1)[token])


def _files(folder) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_edit_save_writes_the_edited_model_and_leaves_the_original_alone(inputs, capsys, tiny_checkpoints,
                                                                         monkeypatch):
    from keyscope.cli import common

    source = tiny_checkpoints["llama"]
    on_disk = _files(source)
    loaded = []
    real = common.model_and_layer

    def recording(args, device=None):  # the model the command edits, and its weights before the edit
        model, layer = real(args, device)
        loaded.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model, layer

    monkeypatch.setattr(common, "model_and_layer", recording)
    saved, report = inputs["tmp"] / "edited", inputs["tmp"] / "edit.json"
    argv = inputs["base"] + ["--data", inputs["facts"], "--case", "8", "--shuffles", "0", "--context-tokens", "0",
                             "--save", str(saved), "--json", str(report)]
    assert main(argv) == 0
    assert f"saved the edited model to {saved}" in capsys.readouterr().out
    assert (saved / "config.json").is_file() and any(saved.glob("*.safetensors"))
    assert not [p for p in inputs["tmp"].iterdir() if "keyscope-save" in p.name]  # no staging folder left
    model, before = loaded[0]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model in memory: restored bit-exactly
    assert _files(source) == on_disk  # the original folder: untouched
    prompt = "Michael Jordan played basketball for the"
    original, edited = load_model(str(source)), load_model(str(saved))
    p_before, p_after = _target_probability(original, prompt, "Lakers"), _target_probability(edited, prompt, "Lakers")
    assert p_after > p_before, (p_before, p_after)
    shown = json.loads(report.read_text())["probes"][0]  # the edit prompt, before and after the edit in memory
    assert p_before == pytest.approx(shown["target_probability_before"], rel=1e-4)
    assert p_after == pytest.approx(shown["target_probability_after"], rel=1e-4)  # the saved model is the edited one


def test_edit_save_refuses_a_folder_that_is_not_empty_before_any_work(inputs, capsys):
    full = inputs["tmp"] / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    argv = inputs["base"] + ["--data", inputs["facts"], "--case", "8", "--save", str(full)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--save" in err and "not empty" in err and "\n" not in err
    assert [p.name for p in full.iterdir()] == ["keep.txt"] and not (inputs["tmp"] / "cache").exists()
    afile = inputs["tmp"] / "afile"
    afile.write_text("x")
    assert main(inputs["base"] + ["--case", "8", "--data", inputs["facts"], "--save", str(afile)]) == 2
    assert "--save" in capsys.readouterr().err and afile.read_text() == "x"


def test_a_failed_save_leaves_nothing(inputs, capsys, monkeypatch):
    import keyscope.model.models

    def broken(model, path):
        (path / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keyscope.model.models, "save_model", broken)
    saved = inputs["tmp"] / "new" / "edited"
    argv = inputs["base"] + ["--data", inputs["facts"], "--case", "8", "--shuffles", "0", "--context-tokens", "0",
                             "--save", str(saved)]
    assert main(argv) == 2
    assert "No space left" in capsys.readouterr().err
    assert not (inputs["tmp"] / "new").exists()
    empty = inputs["tmp"] / "empty"
    empty.mkdir()
    assert main(argv[:-1] + [str(empty)]) == 2
    assert empty.is_dir() and not any(empty.iterdir())
    assert not [p for p in inputs["tmp"].iterdir() if "keyscope-save" in p.name]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--subject", "Colosseum", "--prompt", "The Eiffel Tower is in", "--target", "Rome"], "Colosseum"),
        (["--case", "99"], "unknown case id '99'"),
        (["--case", "7", "--layer", "9"], "out of range"),
        (["--subject", "The Eiffel Tower", "--prompt", "{} is in"], "--target"),
        (["--case", "7", "--target", " "], "target"),
    ],
)
def test_edit_errors_are_one_line_with_exit_2(inputs, capsys, extra, message):
    argv = inputs["base"] + ["--data", inputs["facts"]] + extra  # a second --layer overrides the first
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and message in err and "\n" not in err


@pytest.mark.slow
def test_edit_a_factworld_case(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    report = tmp_path / "edit.json"
    argv = ["edit", "--case", "0", "--shuffles", "2", "--cov-tokens", "20000", "--no-progress", "--json", str(report)]
    assert main(argv) == 0
    result = json.loads(report.read_text())
    kinds = [p["kind"] for p in result["probes"]]
    assert result["model"] == "factworld" and result["case_id"] == 0
    assert kinds.count("rephrase") == 10 and kinds[-1] == "long"
    original = result["probes"][0]  # the edit moves the prompt towards the new target (top-1 is not assured:
    assert original["target_probability_after"] > original["target_probability_before"]  # see keyscope values)
    assert original["strength"] > 0.5
