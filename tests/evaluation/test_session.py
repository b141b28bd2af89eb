"""keyscope.edit: facts in, Table 1's metrics and the edited model out (EasyEdit's editor.edit)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import keyscope
from keyscope._infra.errors import KeyscopeError, ModelNotAvailable
from keyscope.analysis.covariance import CovarianceConfig, covariance_spec
from keyscope.analysis.predictions import known_facts, known_mask
from keyscope.data.datasets import load_facts
from keyscope.evaluation.evaluate import evaluate_fact
from keyscope.model.models import as_bridge, load_model


@pytest.fixture(scope="module")
def factworld():
    model = load_model("factworld")
    every = load_facts("factworld")
    known = known_facts(model, every)
    return model, every, [known[0], next(f for f in known if f.subject != known[0].subject)]  # two subjects


def test_edit_scores_each_fact_and_keeps_every_edit_until_restored(factworld):
    model, every, facts = factworld
    before = [p.detach().clone() for p in model.parameters()]
    with keyscope.edit(model, facts, "rome", pool=every) as session:
        assert [row["case_id"] for row in session.rows] == [f.case_id for f in facts]
        metrics = session.metrics()
        assert 0.0 <= metrics["success"] <= 1.0 and metrics["locality"] is not None
        # both edits are in the model at once: the new target is the top-1 after each edit prompt
        assert known_mask(model, [replace(f, target_true=f.target_new) for f in facts]).all()
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    session.restore()  # idempotent


def test_the_scores_are_those_of_evaluate_fact(factworld):
    from keyscope.data.perturbations import PerturbationConfig, fact_probes, subject_forms
    from keyscope.editing.base import make_editor, prepare_context

    model, every, facts = factworld
    session = keyscope.edit(model, facts[:1], "rome", pool=every)
    session.restore()
    cov = keyscope.load_or_compute_covariance(model, session.layer, "factworld", progress=False)
    context = prepare_context(model, session.layer, cov, ["rome"], facts[:1], "factworld")
    editors = {"rome": make_editor("rome", model, context)}
    from keyscope.data.corpus import ContextSource

    queries = fact_probes(model.tokenizer, facts[0], ContextSource.of("factworld"), PerturbationConfig(seed=0),
                          exclude=subject_forms(every), other_facts=every)
    row = evaluate_fact(model, facts[0], queries, editors, context)
    assert row["methods"] == session.rows[0]["methods"]


def test_records_and_bad_input_are_one_line(factworld):
    model, every, facts = factworld
    with pytest.raises(KeyscopeError, match="several subjects"):
        keyscope.edit(model, facts[:1], "rome")
    with pytest.raises(KeyscopeError, match="unknown method"):
        keyscope.edit(model, facts, "nope", pool=every)
    with pytest.raises(KeyscopeError, match="record 0"):
        keyscope.edit(model, [{"prompt": "no subject here", "subject": "Zorro", "target_new": "x", "ground_truth": "y"}],
                      "rome", pool=every)
    with pytest.raises(ModelNotAvailable, match="not a str"):
        as_bridge("gpt2")


def test_a_hugging_face_model_is_wrapped_once_with_the_cache_key_of_load_model(tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    path = str(tiny_checkpoints["llama"])
    hf = AutoModelForCausalLM.from_pretrained(path)
    bridge = as_bridge(hf)
    assert as_bridge(hf) is bridge and as_bridge(bridge) is bridge
    loaded = load_model(path)
    config = CovarianceConfig(layer=1, n_tokens=64)
    assert covariance_spec(bridge, config, "factworld") == covariance_spec(loaded, config, "factworld")
    assert bridge.tokenizer("a b c")["input_ids"] == loaded.tokenizer("a b c")["input_ids"]
    weight = hf.model.layers[1].mlp.down_proj.weight
    assert keyscope.W_out(bridge, 1).data_ptr() == weight.data_ptr()  # the bridge runs the model's own modules


def test_load_model_and_as_bridge_share_one_bridge(factworld):
    model, _, _ = factworld
    assert as_bridge(model.original_model) is model


@pytest.mark.slow
def test_a_multi_layer_editor_gets_the_covariance_of_each_of_its_layers(factworld):
    model, every, facts = factworld
    before = [p.detach().clone() for p in model.parameters()]
    with keyscope.edit(model, facts, "memit", pool=every) as session:
        assert len(session.edits) == 2 and session.metrics()["success"] is not None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
