from __future__ import annotations

import json

import pytest

from keyscope.cli import main


def test_factworld_info_prints_and_writes_the_report(tmp_path, capsys, monkeypatch):
    """The full accuracy pass is tests/factworld/test_shipped.py's; here each prompt kind is measured on an
    evenly spaced sample of its prompts, and the reported accuracies are checked against a plain one-prompt
    forward pass of the same sample."""
    import torch

    from keyscope.factworld import quality

    samples: dict[str, tuple[list[str], list[str]]] = {}
    real, models = quality.top1_accuracy, []

    def sampled(model, tokenizer, prompts, targets, batch_size=256, desc=None):
        models.append(model)
        kind = ("canonical", "trained_aliases", "alias_only", "shuffled", "long_context")[len(samples)]
        step = max(1, len(prompts) // (8 if kind == "long_context" else 24))  # 300-token prompts: fewer
        samples[kind] = (prompts[::step], targets[::step])
        return real(model, tokenizer, prompts[::step], targets[::step], batch_size, desc)

    monkeypatch.setattr(quality, "top1_accuracy", sampled)
    out = tmp_path / "info.json"
    assert main(["factworld", "info", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"accuracy", "subjects", "relations", "facts", "layer", "n_layers", "tokenizer", "subject_tokens",
            "trace"} <= set(report)
    assert list(report["accuracy"]) == list(samples) == ["canonical", "trained_aliases", "alias_only", "shuffled",
                                                         "long_context"]
    assert report["accuracy"]["canonical"] >= 0.99 and report["accuracy"]["trained_aliases"] >= 0.95
    assert report["n_layers"] >= 6 and report["layer"] >= 1 and report["tokenizer"] == "bpe"
    assert report["subject_tokens"]["median"] >= 4
    assert len(report["trace"]["indirect_effect"]) == report["n_layers"]
    printed = capsys.readouterr().out
    assert "canonical" in printed and f"default edit layer {report['layer']}" in printed
    model = models[0]  # the model the command loaded
    assert model.cfg.n_layers == report["n_layers"]
    for kind, (prompts, targets) in samples.items():
        assert 8 <= len(prompts) <= 30, kind
        hits = 0
        for prompt, target in zip(prompts, targets):
            ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
            with torch.no_grad():
                best = int(model(ids, return_type="logits")[0, -1].argmax())
            hits += best == model.tokenizer(" " + target, add_special_tokens=False)["input_ids"][0]
        assert report["accuracy"][kind] == pytest.approx(hits / len(prompts)), kind
        assert f"{report['accuracy'][kind]:.2%}" in printed


def test_factworld_info_on_a_non_factworld_model_is_one_line(tiny_checkpoints, capsys):
    assert main(["factworld", "info", "--model", str(tiny_checkpoints["llama"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and "not a factworld model" in err and "\n" not in err


def test_missing_model_directory_is_one_line(tmp_path, capsys):
    assert main(["factworld", "info", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and "\n" not in err
