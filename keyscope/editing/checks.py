"""Conformance checks every editor of :data:`~keyscope.editing.base.EDITORS` must pass, in the shape of scikit-learn's
estimator checks (``sklearn/utils/estimator_checks.py``: ``check_estimator``, ``_yield_all_checks`` and
``parametrize_with_checks``).

:mod:`keyscope.editing.base` asks three things of a locate-and-edit method — compute an edit without changing the
model, apply it reversibly, report its strength — and evaluation, the lemma checks and the CLI rely on each of
them. These checks hold an editor to that contract, by name, through the registry alone, so a newly registered
method is checked without a line of test code (issue #26):

* :func:`check_edit_interface`: the edit states its requests, edited layers, gating, own keys and ``Δv*`` as
  :class:`~keyscope.editing.base.ModelEdit` says;
* :func:`check_compute_leaves_model_unchanged`: after ``compute`` every parameter and buffer is bit-identical,
  the ``requires_grad`` flags and train/eval modes are as they were and no hook was left on any module;
* :func:`check_applied_restores`: inside ``applied`` the edit takes effect (weights changed or a hook added, and
  the logits at the edit prompts move); on exit the weights are bit-identical, the hooks gone and the logits
  bit-identical to the unedited model's;
* :func:`check_applied_restores_on_exception`: the same when the ``with`` body raises (the exception passes);
* :func:`check_layer_weights_sum_to_one`: each request's layer weights ``w_l`` sum to 1;
* :func:`check_strength_at_own_keys`: the strength at the request's own keys
  (:meth:`~keyscope.editing.base.ModelEdit.own_keys`) is 1 at every edited layer and combined
  (``s(k*) = k*ᵀC⁻¹k* / k*ᵀC⁻¹k* = 1`` for ROME, Lemma 4.1; ``Σ_l w_l s_l = 1`` for a multi-layer edit);
* :func:`check_same_seed_same_edit`: a second ``compute`` under another state of torch's global generator gives
  a bit-identical edit: the weights inside ``applied`` (the ``ΔW`` of every layer), the parameters of every key
  adaptor of a gated edit and the edited logits;
* :func:`check_edit_writes_target`: inside ``applied`` the new target of every request is more probable after
  its prompt than on the unedited model (a weak check, but one a broken edit fails).

The checks run on a :class:`CheckSetting` — a model, the :class:`~keyscope.editing.base.EditContext` of a run, the
requests and their probes — that the caller builds (the test suite: a tiny random LLaMA with its own card,
``tests/editing/test_editor_conformance.py``). :func:`check_editor` runs them all on one method;
:func:`parametrize_with_checks` parametrizes a pytest test over ``(method, check)`` pairs with readable ids, and
marks the checks ``expected_failed_checks`` names as strict xfails, as scikit-learn's does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from keyscope.analysis.predictions import score_targets, target_sequence
from keyscope.data.prompts import encode, fill
from keyscope.editing.base import EDITORS, EditContext, GatedEdit, ModelEdit, editor_class, make_editor
from keyscope.editing.request import EditRequest
from keyscope.model.models import d_mlp, d_model, n_layers

__all__ = ["CheckSetting", "ConformanceError", "yield_all_checks", "check_editor", "parametrize_with_checks",
           "check_edit_interface", "check_compute_leaves_model_unchanged", "check_applied_restores",
           "check_applied_restores_on_exception", "check_layer_weights_sum_to_one", "check_strength_at_own_keys",
           "check_same_seed_same_edit", "check_edit_writes_target"]

#: How far a strength or a sum of layer weights may be from 1: they are formed in float32 from float64 solves.
STRENGTH_ATOL = 1e-4


class ConformanceError(AssertionError):
    """An editor broke the contract of :mod:`keyscope.editing.base` (the message names the method and the check)."""


@dataclass
class CheckSetting:
    """What the checks run on: a loaded ``model``, the ``context`` of a run (:func:`~keyscope.editing.base.prepare_context`,
    for every method to check), the ``requests`` to write together (two or more exercise a batch editor's
    request index) and, for methods that need them, one entry of ``probes`` per request. Edits computed by
    :meth:`edit` are kept (``compute`` leaves the model unchanged, :func:`check_compute_leaves_model_unchanged`)."""

    model: object
    context: EditContext
    requests: Sequence
    probes: Sequence | None = None
    _edits: dict = field(default_factory=dict, repr=False)

    def compute(self, name: str) -> ModelEdit:
        """A fresh edit of the requests by method ``name``."""
        return make_editor(name, self.model, self.context).compute(self.requests, self.probes)

    def edit(self, name: str) -> ModelEdit:
        """The edit of the requests by method ``name``, computed once."""
        if name not in self._edits:
            self._edits[name] = self.compute(name)
        return self._edits[name]

    def prompts(self) -> list[str]:
        """Each request's filled prompt."""
        return [fill(r.template, r.subject).text for r in self.edit_requests()]

    def edit_requests(self) -> list:
        """The requests as :class:`~keyscope.editing.request.EditRequest` (as an edit holds them)."""
        return [r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in self.requests]


def _fail(name: str, check: str, message: str) -> None:
    raise ConformanceError(f"{name}: {check}: {message}")


# ---------------------------------------------------------------------------------------------- model state


@dataclass(frozen=True)
class _State:
    """A copy of what an editor may touch: every parameter and buffer, their ``requires_grad`` flags, the modules'
    train/eval modes and the ids of every hook (PyTorch's on each module and the global ones, TransformerLens'
    ``fwd_hooks``/``bwd_hooks`` lists on hook points)."""

    tensors: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    hooks: dict[str, tuple]


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hooks(model) -> dict[str, tuple]:
    """``{module name: hook ids}`` of every module holding a hook, plus the global module hooks under ``""``."""
    hooks = {}
    for name, module in model.named_modules():
        ids = tuple(tuple(getattr(module, attr, {}).keys()) for attr in _MODULE_HOOKS)
        lens = tuple(len(getattr(module, attr, ())) for attr in ("fwd_hooks", "bwd_hooks"))  # TransformerLens
        if any(ids) or any(lens):
            hooks[name] = (ids, lens)
    from torch.nn.modules import module as torch_module

    hooks[""] = tuple(tuple(getattr(torch_module, attr, {}).keys()) for attr in _GLOBAL_HOOKS)
    return hooks


def _tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (the live tensors)."""
    parameters = {f"parameter {n}": p for n, p in model.named_parameters()}
    return parameters | {f"buffer {n}": b for n, b in model.named_buffers()}


def _state(model) -> _State:
    return _State({n: t.detach().clone() for n, t in _tensors(model).items()},
                  {n: p.requires_grad for n, p in model.named_parameters()},
                  {n: m.training for n, m in model.named_modules()}, _hooks(model))


def _changed_tensors(model, before: _State) -> list[str]:
    now = _tensors(model)
    return [n for n, t in before.tensors.items() if n not in now or not torch.equal(now[n].detach(), t)]


def _differences(model, before: _State) -> list[str]:
    """What differs from ``before``, in words (``[]``: nothing)."""
    out = [f"{n} changed" for n in _changed_tensors(model, before)]
    if {n: p.requires_grad for n, p in model.named_parameters()} != before.requires_grad:
        out.append("requires_grad flags changed")
    if {n: m.training for n, m in model.named_modules()} != before.training:
        out.append("train/eval modes changed")
    hooks = _hooks(model)
    if hooks != before.hooks:
        modules = sorted(k for k in hooks.keys() | before.hooks.keys() if hooks.get(k) != before.hooks.get(k))
        out.append(f"hooks differ on {modules[:5]}")
    return out


@torch.no_grad()
def _logits(model, prompts: Sequence[str]) -> list[torch.Tensor]:
    """The logits ``(pos, vocab)`` of each prompt, run alone."""
    out = []
    for text in prompts:
        ids = torch.tensor([encode(model.tokenizer, text).ids], device=model.cfg.device)  # (1, pos)
        out.append(model(ids, return_type="logits")[0].detach().clone())
    return out


def _target_log_probability(model, setting: CheckSetting) -> torch.Tensor:
    """``log P(target_new | prompt)`` ``(n_requests,)``, teacher-forced over the target's tokens."""
    sequences = [target_sequence(model.tokenizer, fill(r.template, r.subject).text, r.target_new)
                 for r in setting.edit_requests()]
    return score_targets(model, sequences).log_probability


# ---------------------------------------------------------------------------------------------- checks


def check_edit_interface(name: str, setting: CheckSetting) -> None:
    """The edit holds the requests in order, its ``layers`` are increasing and exist, ``gated`` agrees with the
    editor class's, and for each request ``own_keys`` gives one ``(d_mlp,)`` key per edited layer,
    ``layer_weights`` one weight per edited layer and ``value_direction`` a ``(d_model,)`` vector."""
    cls = editor_class(name)
    if cls.name != name:
        _fail(name, "check_edit_interface", f"the editor class {cls.__name__} is named {cls.name!r}")
    if cls.base is not None and cls.base not in EDITORS:
        _fail(name, "check_edit_interface", f"it adapts {cls.base!r}, which is not registered")
    edit = setting.edit(name)
    model = setting.model
    if list(edit.requests) != setting.edit_requests():
        _fail(name, "check_edit_interface", "the edit's requests are not the requests given, in order")
    layers = tuple(edit.layers)
    if not layers or list(layers) != sorted(set(layers)) or not all(0 <= layer < n_layers(model) for layer in layers):
        _fail(name, "check_edit_interface", f"its layers {layers} are not increasing layers of the model")
    if bool(edit.gated) != bool(cls.gated):
        _fail(name, "check_edit_interface", f"edit.gated is {edit.gated}, the editor's gated {cls.gated}")
    if edit.gated and not isinstance(edit, GatedEdit):
        _fail(name, "check_edit_interface", f"its gated edit {type(edit).__name__} is not a GatedEdit")
    if cls.config_name is not None and cls.config_name not in setting.context.configs:
        _fail(name, "check_edit_interface", f"prepare_context left no {cls.config_name!r} config for it")
    if cls.config_name is not None and not isinstance(setting.context.configs[cls.config_name], cls.config_class):
        _fail(name, "check_edit_interface", f"its config {cls.config_name!r} is not a {cls.config_class}")
    width, depth = d_mlp(model), d_model(model)
    for i in range(len(setting.requests)):
        keys = edit.own_keys(i)
        if tuple(keys) != layers or any(tuple(k.shape) != (width,) for k in keys.values()):
            _fail(name, "check_edit_interface", f"own_keys({i}) is not one ({width},) key per layer {layers}")
        if tuple(edit.layer_weights(i)) != layers:
            _fail(name, "check_edit_interface", f"layer_weights({i}) is not one weight per layer {layers}")
        if tuple(edit.value_direction(i).shape) != (depth,):
            _fail(name, "check_edit_interface", f"value_direction({i}) is not ({depth},)")


def check_compute_leaves_model_unchanged(name: str, setting: CheckSetting) -> None:
    """``compute`` leaves every parameter and buffer bit-identical, the ``requires_grad`` flags and modes as they
    were and no hook behind (it may write and restore weights, as MEMIT does layer by layer, and hook the model
    while it optimises, as ROME's v* does)."""
    before = _state(setting.model)
    edit = setting.compute(name)
    differences = _differences(setting.model, before)
    if differences:
        _fail(name, "check_compute_leaves_model_unchanged", "; ".join(differences[:5]))
    setting._edits.setdefault(name, edit)


def _check_inside(name: str, check: str, setting: CheckSetting, edit: ModelEdit, before: _State,
                  unedited: list[torch.Tensor]) -> None:
    """Inside ``applied``: the edit takes effect — a weight changed or a hook was added (a hook, for a gated
    edit), and the logits at some request's prompt moved."""
    model = setting.model
    changed = _changed_tensors(model, before)
    hooked = _hooks(model) != before.hooks
    if not changed and not hooked:
        _fail(name, check, "inside applied no weight changed and no hook was added")
    if edit.gated and not hooked:
        _fail(name, check, "a gated edit added no hook inside applied")
    edited = _logits(model, setting.prompts())
    if all(torch.equal(a, b) for a, b in zip(edited, unedited)):
        _fail(name, check, "inside applied the logits at the requests' prompts are the unedited model's")


def _check_restored(name: str, check: str, setting: CheckSetting, before: _State, unedited: list[torch.Tensor]) -> None:
    differences = _differences(setting.model, before)
    if differences:
        _fail(name, check, "after applied: " + "; ".join(differences[:5]))
    after = _logits(setting.model, setting.prompts())
    if not all(torch.equal(a, b) for a, b in zip(after, unedited)):
        _fail(name, check, "after applied the logits differ from the unedited model's")


def check_applied_restores(name: str, setting: CheckSetting) -> None:
    """Inside ``applied`` the edit takes effect (:func:`_check_inside`); on exit every parameter and buffer is
    bit-identical, no hook remains and the logits are bit-identical to the unedited model's."""
    edit = setting.edit(name)
    before = _state(setting.model)
    unedited = _logits(setting.model, setting.prompts())
    with edit.applied(setting.model):
        _check_inside(name, "check_applied_restores", setting, edit, before, unedited)
    _check_restored(name, "check_applied_restores", setting, before, unedited)


class _Raised(Exception):
    """The exception :func:`check_applied_restores_on_exception` raises inside ``applied``."""


def check_applied_restores_on_exception(name: str, setting: CheckSetting) -> None:
    """An exception raised inside ``applied`` (after a forward pass through the edited model) passes through
    it unchanged, and the model is restored as on a normal exit."""
    edit = setting.edit(name)
    before = _state(setting.model)
    unedited = _logits(setting.model, setting.prompts())
    raised = _Raised("raised inside applied")
    try:
        with edit.applied(setting.model):
            _logits(setting.model, setting.prompts())
            raise raised
    except _Raised as exc:
        if exc is not raised:
            _fail(name, "check_applied_restores_on_exception", "applied replaced the exception raised inside it")
    else:
        _fail(name, "check_applied_restores_on_exception", "applied swallowed the exception raised inside it")
    _check_restored(name, "check_applied_restores_on_exception", setting, before, unedited)


def check_layer_weights_sum_to_one(name: str, setting: CheckSetting) -> None:
    """For every request, the layer weights ``w_l`` (the share of ``Δv*`` each edited layer writes, along it) sum
    to 1 (to :data:`STRENGTH_ATOL`): ``{layer: 1}`` for an edit of one layer."""
    edit = setting.edit(name)
    for i in range(len(setting.requests)):
        weights = edit.layer_weights(i)
        total = sum(weights.values())
        if abs(total - 1.0) > STRENGTH_ATOL:
            _fail(name, "check_layer_weights_sum_to_one",
                  f"request {i}'s layer weights {weights} sum to {total}, not 1")


def check_strength_at_own_keys(name: str, setting: CheckSetting) -> None:
    """For every request ``i``, at its own keys ``{l: k_{i,l}}`` (:meth:`~keyscope.editing.base.ModelEdit.own_keys`) the
    strength is 1 at every edited layer and the combined strength ``Σ_l w_l s_l(k_{i,l})`` is 1 (to
    :data:`STRENGTH_ATOL`): the edit's own key receives the whole edit (``s(k*) = k*ᵀC⁻¹k* / k*ᵀC⁻¹k*`` for ROME,
    Lemma 4.1). For a gated edit the strength is that of the adapted keys at the edit's own threshold, so the
    check asks the adaptor to leave ``k*`` where it is (its gate off there, or its anchors keeping ``k*``)."""
    edit = setting.edit(name)
    for i in range(len(setting.requests)):
        keys = edit.own_keys(i)
        for layer, key in keys.items():
            s = float(edit.strength(key, layer, i))
            if abs(s - 1.0) > STRENGTH_ATOL:
                _fail(name, "check_strength_at_own_keys",
                      f"request {i}'s strength at its own key of layer {layer} is {s}")
        alpha = float(edit.combined_strength(keys, i))
        if abs(alpha - 1.0) > STRENGTH_ATOL:
            _fail(name, "check_strength_at_own_keys", f"request {i}'s combined strength at its own keys is {alpha}")


def _adaptor_tensors(edit: ModelEdit) -> list[tuple[str, torch.Tensor]]:
    """The parameters and buffers of every key adaptor of a gated edit (a fitted REP's ``adaptor_``, or a module)."""
    out = []
    if not isinstance(edit, GatedEdit):
        return out
    for j, (request, adaptor) in enumerate(edit.request_adaptors()):
        module = getattr(adaptor, "adaptor_", adaptor)
        out += [(f"adaptor {j} (request {request}) {n}", t) for n, t in module.state_dict().items()]
    return out


def check_same_seed_same_edit(name: str, setting: CheckSetting) -> None:
    """A second ``compute`` with the same settings (seeds included), under a different state of torch's global
    generator, gives a bit-identical edit: every weight inside ``applied`` (so every layer's ``ΔW``), every key
    adaptor's parameters and the edited logits at the requests' prompts."""
    first = setting.edit(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        torch.rand(7)
        second = setting.compute(name)
    model, prompts = setting.model, setting.prompts()
    edited = []
    for edit in (first, second):
        with edit.applied(model):
            edited.append((_state(model).tensors, _logits(model, prompts)))
    (weights_a, logits_a), (weights_b, logits_b) = edited
    differ = [n for n in weights_a if not torch.equal(weights_a[n], weights_b[n])]
    if differ:
        _fail(name, "check_same_seed_same_edit", f"the edited weights differ: {differ[:5]}")
    adaptors_a, adaptors_b = _adaptor_tensors(first), _adaptor_tensors(second)
    if [n for n, _ in adaptors_a] != [n for n, _ in adaptors_b]:
        _fail(name, "check_same_seed_same_edit", "the two edits have different adaptors")
    differ = [n for (n, a), (_, b) in zip(adaptors_a, adaptors_b) if not torch.equal(a, b)]
    if differ:
        _fail(name, "check_same_seed_same_edit", f"the adaptors differ: {differ[:5]}")
    if not all(torch.equal(a, b) for a, b in zip(logits_a, logits_b)):
        _fail(name, "check_same_seed_same_edit", "the edited logits differ")


def check_edit_writes_target(name: str, setting: CheckSetting) -> None:
    """Inside ``applied`` each request's new target is more probable after its prompt than before the edit
    (teacher-forced over the target's tokens)."""
    edit = setting.edit(name)
    before = _target_log_probability(setting.model, setting)  # (n_requests,)
    with edit.applied(setting.model):
        after = _target_log_probability(setting.model, setting)  # (n_requests,)
    worse = [i for i in range(len(before)) if not after[i] > before[i]]
    if worse:
        _fail(name, "check_edit_writes_target", f"log P(target_new) did not rise for requests {worse}: "
                                                f"{before.tolist()} → {after.tolist()}")


# ---------------------------------------------------------------------------------------------- running them


def yield_all_checks(name: str) -> Iterator[Callable[[str, CheckSetting], None]]:
    """The checks of method ``name``, in order (``_yield_all_checks`` of scikit-learn): every method gets every
    check; the gated ones' extra demands are inside the checks (:attr:`~keyscope.editing.base.ModelEdit.gated`)."""
    editor_class(name)  # an unknown name fails here, in one line
    yield check_edit_interface
    yield check_compute_leaves_model_unchanged
    yield check_applied_restores
    yield check_applied_restores_on_exception
    yield check_layer_weights_sum_to_one
    yield check_strength_at_own_keys
    yield check_same_seed_same_edit
    yield check_edit_writes_target


def check_editor(name: str, setting: CheckSetting) -> None:
    """Run every check of :func:`yield_all_checks` on method ``name`` (``check_estimator`` of scikit-learn);
    the first that fails raises :class:`ConformanceError`."""
    for check in yield_all_checks(name):
        check(name, setting)


def parametrize_with_checks(names: Iterable[str] | None = None,
                            expected_failed_checks: Callable[[str], Mapping[str, str]] | None = None):
    """A ``pytest.mark.parametrize`` over ``("name", "check")`` for every check of every method of ``names``
    (default: every entry of :data:`EDITORS`, read when the test module is collected), with ids
    ``"{method}-{check}"`` (``pytest -k memit+rep-check_applied_restores``). ``expected_failed_checks(name)`` maps
    a check's name to the reason it is known to fail for that method: those are marked
    ``xfail(strict=True)``, so a fix makes them fail too (scikit-learn's ``parametrize_with_checks``). The test
    calls ``check(name, setting)`` with its own :class:`CheckSetting`."""
    import pytest

    names = tuple(EDITORS) if names is None else tuple(names)
    params = []
    for name in names:
        expected = dict(expected_failed_checks(name)) if expected_failed_checks is not None else {}
        for check in yield_all_checks(name):
            reason = expected.pop(check.__name__, None)
            marks = [pytest.mark.xfail(raises=ConformanceError, strict=True, reason=reason)] if reason else []
            params.append(pytest.param(name, check, id=f"{name}-{check.__name__}", marks=marks))
        if expected:
            raise ValueError(f"expected_failed_checks names checks that {name} does not have: {sorted(expected)}")
    return pytest.mark.parametrize(("name", "check"), params)
