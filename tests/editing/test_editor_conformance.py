"""The editor conformance suite (issue #26): every check of :mod:`keyscope.editing.checks` on every method of
:data:`keyscope.editing.base.EDITORS`, read from the registry when this module is collected, so a newly registered
method is checked with no change here (scikit-learn's ``parametrize_with_checks``,
``sklearn/utils/estimator_checks.py``).

The setting is the smallest every editor runs on: a tiny random LLaMA (3 layers, ``d_mlp = 128``) whose
``keyscope.json`` card gives MEMIT two layers and a small λ (as factworld's card gives its own), ROME's v* and
MEMIT's z a few steps and two context prefixes, REP its default settings (150 steps, gate negatives of the
requests' subjects and of corpus text), two requests written together and one rephrased probe per request. The
whole suite takes seconds.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from keyscope.analysis.covariance import KeyCovariance
from keyscope.data.perturbations import Probe
from keyscope.editing import rep, rome
from keyscope.editing.base import EDITORS, ModelEdit, prepare_context
from keyscope.editing.checks import (
    CheckSetting,
    ConformanceError,
    check_applied_restores,
    check_applied_restores_on_exception,
    check_compute_leaves_model_unchanged,
    check_editor,
    parametrize_with_checks,
    yield_all_checks,
)
from keyscope.editing.request import EditRequest
from keyscope.model.models import MODEL_CARD, W_out, down_projection, load_model
from tests import hf_tiny

LAYER = 1
#: MEMIT's settings for the tiny model, through its card as a real model's come through its own.
CARD = {"memit_config": {"layers": [0, 1], "mom2_update_weight": 2.0, "v_num_grad_steps": 4}}
#: Checks a method is known to fail, with the reason (``xfail(strict=True)``: a fix makes the suite fail until the
#: entry goes).
EXPECTED_FAILED_CHECKS = {
    method: {"check_strength_at_own_keys": (
        "REP keeps the edit prompt's keys only through a soft anchor penalty, on the bare prompt's key by default "
        "(anchor='bare', the released code's) rather than the prefix-averaged k*: where its gate is on at k* the "
        "adaptor moves it, s(k̂*) = 0.968-1.001 on the tiny model (0.997-1.004 with anchor='prefixes')")}
    for method in ("rome+rep", "memit+rep")
}
REQUESTS = (EditRequest("The actress {}", "Danielle Darrieux", "Paris"),
            EditRequest("{} played basketball for the", "Michael Jordan", "Lakers"))


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEYSCOPE_CACHE", str(root / "cache"))  # ROME's context prefixes are cached: not in ~/.cache
        path = hf_tiny.save_tiny_checkpoint("llama", root / "llama")
        (path / MODEL_CARD).write_text(json.dumps(CARD))
        model = load_model(str(path))
        covariances = {layer: KeyCovariance(layer, n_tokens=2000, seq_len=64, progress=False)
                       .fit(model, hf_tiny.TRAINING_TEXT * 10) for layer in CARD["memit_config"]["layers"]}
        rome_config = rome.ROMEConfig.for_model(model, v_num_grad_steps=5, context_template_length_params=((3, 2),),
                                                prefix_seeds=())
        context = prepare_context(model, LAYER, covariances[LAYER], list(EDITORS), REQUESTS,
                                  list(hf_tiny.TRAINING_TEXT), {"rome": rome_config, "rep": rep.REPConfig()},
                                  n_corpus_negatives=16,
                                  load_covariance=covariances.__getitem__)
        probes = [[Probe(r.template, r.subject.split()[-1], "rephrase")] for r in REQUESTS]
        yield CheckSetting(model, context, REQUESTS, probes)


@parametrize_with_checks(expected_failed_checks=lambda name: EXPECTED_FAILED_CHECKS.get(name, {}))
def test_editor_conformance(name, check, setting):
    check(name, setting)


def test_every_registered_editor_gets_every_check():
    ids = [p.id for p in parametrize_with_checks().args[1]]
    assert {i.split("-check_")[0] for i in ids} == set(EDITORS)
    assert len(ids) == len(EDITORS) * len(list(yield_all_checks("rome")))
    with pytest.raises(ValueError, match="does not have"):
        parametrize_with_checks(["rome"], lambda name: {"check_nothing": "no such check"})


# ---------------------------------------------------------------------------------------------- the checks fail


class _Leaky(ModelEdit):
    """A broken edit: ``applied`` adds to ``W_out`` and hooks the down-projection, and undoes neither (the test
    removes the hook through :attr:`handles`)."""

    requests = REQUESTS
    layers = (LAYER,)
    handles: list = []

    def applied(self, model, tau=None):
        @contextmanager
        def leaking():
            W_out(model, LAYER).add_(1.0)
            self.handles.append(down_projection(model, LAYER).register_forward_hook(lambda module, args, out: None))
            yield model

        return leaking()

    def strength(self, keys, layer=None, request=0, tau=None):
        return torch.ones(keys.shape[:-1])


def test_the_checks_catch_an_edit_that_leaks_weights_and_hooks(setting, monkeypatch):
    leaky = CheckSetting(setting.model, setting.context, REQUESTS, setting.probes)
    leaky._edits["rome"] = _Leaky()
    model = setting.model
    saved = W_out(model, LAYER).clone()
    try:
        with pytest.raises(ConformanceError, match="rome: check_applied_restores: after applied: .*changed.*hooks"):
            check_applied_restores("rome", leaky)
    finally:
        W_out(model, LAYER).copy_(saved)
        while _Leaky.handles:
            _Leaky.handles.pop().remove()

    def writes(self, requests, probes=None):  # a compute that leaves its edit in the weights
        W_out(self.model, LAYER).mul_(2.0)
        return _Leaky()

    monkeypatch.setattr(EDITORS["rome"], "compute", writes)
    try:
        with pytest.raises(ConformanceError, match="check_compute_leaves_model_unchanged: parameter .*changed"):
            check_compute_leaves_model_unchanged("rome", leaky)
    finally:
        W_out(model, LAYER).copy_(saved)


def test_the_checks_catch_an_applied_that_swallows_the_exception(setting):
    class Swallows(_Leaky):
        def applied(self, model, tau=None):
            @contextmanager
            def swallowing():
                try:
                    yield model
                except Exception:
                    pass

            return swallowing()

    broken = CheckSetting(setting.model, setting.context, REQUESTS, setting.probes)
    broken._edits["rome"] = Swallows()
    with pytest.raises(ConformanceError, match="swallowed"):
        check_applied_restores_on_exception("rome", broken)


def test_check_editor_runs_every_check_on_one_method(setting):
    check_editor("rome", setting)  # also: the broken edits above left the shared model as the fixture built it
