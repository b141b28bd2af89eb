from __future__ import annotations

import numpy as np
import pytest

from keyscope._infra.errors import KeyscopeError
from keyscope.analysis.covariance import KeyCovariance
from keyscope.data.datasets import Fact
from keyscope.data.perturbations import PerturbationConfig, fact_probes
from keyscope.editing import rep, rome
from keyscope.editing.base import make_editor, prepare_context
from keyscope.evaluation import ablation
from keyscope.evaluation import evaluate as ev
from keyscope.model.models import load_model
from tests import hf_tiny

LAYER = 1
FACT = Fact(0, "The actress {}", "Danielle Darrieux", "Paris", "French",
            neighborhood_prompts=("The actress Michael Jordan", "The actress Kobe Bryant"),
            subject_rephrase=("Darrieux", "Danielle", "the actress Darrieux"))
OTHER = Fact(1, "{} is located in", "The Eiffel Tower", "Rome", "Paris")


@pytest.fixture(scope="module")
def setup(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama"]))
    cov = KeyCovariance(LAYER, n_tokens=2000, seq_len=64, progress=False).fit(model, hf_tiny.TRAINING_TEXT * 10)
    config = PerturbationConfig(n_shuffles=2, n_word_shuffles=2, n_long_contexts=2, long_context_tokens=20)
    queries = fact_probes(model.tokenizer, FACT, iter(hf_tiny.TRAINING_TEXT * 20), config, other_facts=[FACT, OTHER])
    return model, cov, queries


def test_the_keyscope_variant_scores_exactly_as_table1(setup):
    model, cov, queries = setup
    rome_configs = {ref: rome.ROMEConfig.for_model(model, reference=ref, v_num_grad_steps=3) for ref in (False, True)}
    rep_config = rep.REPConfig(steps=30)
    context = prepare_context(model, LAYER, cov, ev.METHODS, [FACT, OTHER], list(hf_tiny.TRAINING_TEXT * 5),
                              {"rome": rome_configs[False], "rep": rep_config}, n_corpus_negatives=16)
    contexts = {ref: context.with_config("rome", rome_configs[ref]) for ref in (False, True)}
    variants = (ablation.Variant("keyscope", "x", rep_config),
                ablation.Variant("released", "y", rep.REPConfig.released(), rome_reference=True),
                ablation.Variant("no_negatives", "z", rep.REPConfig(steps=30, gate_negatives=False)))
    row = ablation.ablate_fact(model, FACT, queries, variants, contexts)
    assert set(row["methods"]) == {"rome", "rome (reference)", "keyscope", "released", "no_negatives"}
    editors = {m: make_editor(m, model, context) for m in ev.METHODS}
    table1 = ev.evaluate_fact(model, FACT, queries, editors, context)
    assert row["methods"]["keyscope"] == table1["methods"]["rome+rep"]
    assert row["methods"]["rome"] == table1["methods"]["rome"]
    reference = ev.evaluate_fact(model, FACT, queries, {"rome": make_editor("rome", model, contexts[True])},
                                 contexts[True])
    assert row["methods"]["rome (reference)"] == reference["methods"]["rome"]


def test_near_twins_with_the_ood_keys_computed_once_are_identical(setup):
    model, cov, queries = setup
    ood_keys = ev.ood_probe_keys(model, queries, LAYER)  # (n_ood, d_mlp)
    assert len(ood_keys) == sum(len(queries.perturbed[kind][1]) for kind in queries.perturbed) > 0
    prefixes = ("", "Hello . ")
    for config in (rep.REPConfig(), rep.REPConfig.released(), rep.REPConfig(train_long_context=False)):
        assert ev.near_twins(model, queries, LAYER, cov, config, prefixes=prefixes, ood_keys=ood_keys) == \
            ev.near_twins(model, queries, LAYER, cov, config, prefixes=prefixes), config
    with pytest.raises(ValueError, match="out-of-domain keys"):
        ev.near_twins(model, queries, LAYER, cov, rep.REPConfig(), ood_keys=ood_keys[:1])


def test_differences_are_paired_against_keyscope():
    from keyscope.evaluation.metrics import METRICS

    def scored(success, locality):
        return {m: (0, 0, 0) for m in METRICS} | {"success": (success, 1, success), "locality": locality}

    # three facts; "worse" loses one success (fact 0) and 2 of 10 neighbourhood prompts on fact 2
    rows = [{"case_id": i, "methods": {"keyscope": scored(1, (10, 10, 0)), "worse": scored(s, loc)}}
            for i, (s, loc) in enumerate([(0, (10, 10, 0)), (1, (10, 10, 0)), (1, (8, 10, 0))])]
    diff = ablation.differences(rows, ["keyscope", "worse"], n_resamples=300, seed=2)
    assert set(diff) == {"worse"}
    assert diff["worse"]["difference"]["success"] == pytest.approx(-1 / 3)
    assert diff["worse"]["difference"]["locality"] == pytest.approx(-2 / 30)
    assert diff["worse"]["difference"]["rephrase_id"] is None and diff["worse"]["difference_ci"]["rephrase_id"] is None
    a, b = np.array([0, 1, 1]), np.ones(3)
    assert diff["worse"]["difference_ci"]["success"] == list(ev.paired_bootstrap_interval(a, b, b, b, 300, 2))
    lo, hi = diff["worse"]["difference_ci"]["locality"]
    assert -0.2 <= lo <= -2 / 30 <= hi <= 0


def test_verdict_reads_the_paired_intervals():
    from keyscope.evaluation.metrics import METRICS

    cols = METRICS
    none = {m: None for m in cols}
    assert ablation.verdict(none) == {"verdict": "no measured effect", "helps": [], "hurts": [], "keep": False}
    straddle = {m: [-0.05, 0.02] for m in cols}
    assert ablation.verdict(straddle)["verdict"] == "no measured effect"
    # reverting lowers success measurably: keyscope's choice helps success
    helps = straddle | {"success": [-0.1, -0.01]}
    assert ablation.verdict(helps) == {"verdict": "helps", "helps": ["success"], "hurts": [], "keep": True}
    hurts = straddle | {"long_id": [0.01, 0.2]}
    assert ablation.verdict(hurts) == {"verdict": "hurts", "helps": [], "hurts": ["long_id"], "keep": False}
    both = helps | {"locality": [0.001, 0.03]}
    v = ablation.verdict(both)
    assert v["verdict"] == "trade-off" and v["keep"] and v["hurts"] == ["locality"]
    # an interval touching 0 is not a measured effect; every Table 1 column counts, a subset only its own
    assert ablation.verdict(straddle | {"success": [-0.1, 0.0]})["verdict"] == "no measured effect"
    assert ablation.verdict(straddle | {"shuffle_words_id": [-0.3, -0.2]})["helps"] == ["shuffle_words_id"]
    assert ablation.verdict(straddle | {"shuffle_words_id": [-0.3, -0.2]}, ["success"])["verdict"] == \
        "no measured effect"


def test_variants_are_the_departures_of_the_issue():
    names = [v.name for v in ablation.VARIANTS]
    assert names[:2] == ["keyscope", "released"] and len(set(names)) == len(names)
    for wanted in ("objective", "steps_lr", "input_scaling", "anchor", "long_context", "gate_negatives",
                   "dropout_at_test", "rome_reference"):
        assert wanted in names
    by_name = {v.name: v for v in ablation.VARIANTS}
    assert by_name["keyscope"].rep == rep.REPConfig() and not by_name["keyscope"].rome_reference
    assert by_name["released"].rep == rep.REPConfig.released() and by_name["released"].rome_reference
    covered = set()
    for v in ablation.VARIANTS[2:]:  # each reverts one departure, or tries one dropped choice: a few fields, or ROME's mode
        changed = {f for f in rep.REPConfig.__dataclass_fields__ if getattr(v.rep, f) != getattr(rep.REPConfig(), f)}
        assert (changed and len(changed) <= 3 and not v.rome_reference) or (not changed and v.rome_reference), v.name
        released = {f for f in changed if getattr(v.rep, f) == getattr(rep.REPConfig.released(), f)}
        if v.tried:  # the default is the released code's choice; the variant moves away from it
            assert not released and all(getattr(rep.REPConfig(), f) == getattr(rep.REPConfig.released(), f)
                                        for f in changed), v.name
        else:
            assert released == changed - {"positive_kinds"}, v.name
            covered |= changed
    released, default = rep.REPConfig.released(), rep.REPConfig()
    differing = {f for f in rep.REPConfig.__dataclass_fields__ if getattr(released, f) != getattr(default, f)}
    assert differing <= covered, differing - covered  # together the variants revert every departure


def test_ablate_refuses_duplicate_or_no_variants(setup):
    model, cov, _ = setup
    with pytest.raises(KeyscopeError):
        ablation.ablate(model, [FACT], LAYER, cov, iter(()), variants=())
    twice = (ablation.VARIANTS[0], ablation.VARIANTS[0])
    with pytest.raises(KeyscopeError, match="distinct"):
        ablation.ablate(model, [FACT], LAYER, cov, iter(()), variants=twice)


@pytest.mark.slow
def test_a_stopped_ablation_resumes_from_its_checkpoint_to_the_same_result(tmp_path, monkeypatch):
    """:func:`keyscope.evaluation.ablation.ablate` keeps its per-fact rows in a :class:`keyscope.evaluation.evaluate.Checkpoint` as
    :func:`keyscope.evaluation.evaluate.evaluate` does (the shared :func:`keyscope.evaluation.evaluate.run_facts`); the rows are stand-ins,
    the mechanism is the real one on factworld's facts."""
    import torch

    from keyscope.data.datasets import load_facts
    from keyscope.evaluation.metrics import METRICS

    model = load_model("factworld")
    facts = load_facts("factworld")
    cov = torch.eye(model.cfg.d_mlp)  # (d_mlp, d_mlp): the stand-in rows never edit
    variants = (ablation.Variant("keyscope", "x", rep.REPConfig(gate_negatives=False)),
                ablation.Variant("other", "y", rep.REPConfig(gate_negatives=False, steps=3)))
    scored = []

    def run(stop_after=None, resume=False):
        def score(model, fact, queries, variants, contexts, twin_cosine):
            if len(scored) == stop_after:
                raise KeyboardInterrupt
            scored.append(fact.case_id)
            return {"case_id": fact.case_id, "methods": {name: {m: (len(fact.subject) % 3, 3, i % 2)
                                                                for i, m in enumerate(METRICS)}
                                                         for name in ("rome", "rome (reference)", "keyscope", "other")}}

        monkeypatch.setattr(ablation, "ablate_fact", score)
        checkpoint = ev.Checkpoint({"context": "test"}, resume=resume, root=tmp_path)
        result = ablation.ablate(model, facts, 3, cov, iter(["filler text . "] * 10_000), variants=variants,
                                 config=ev.EvalConfig(n=3, bootstrap=50), progress=False, checkpoint=checkpoint)
        return result, checkpoint

    whole, _ = run()
    scored.clear()
    with pytest.raises(KeyboardInterrupt):
        run(stop_after=2)
    assert len(list(tmp_path.glob(f"{ev.CHECKPOINT_KIND}/*/rank0of1.json"))) == 1
    resumed, checkpoint = run(resume=True)
    assert checkpoint.restored == 2 and len(scored) == 3  # one fact scored after the two restored
    assert resumed.summary == whole.summary and resumed.skipped == whole.skipped
    assert [r["case_id"] for r in resumed.rows] == [r["case_id"] for r in whole.rows]
    checkpoint.remove()
    assert not list(tmp_path.glob(f"{ev.CHECKPOINT_KIND}/*/*"))
