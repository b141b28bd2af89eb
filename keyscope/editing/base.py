"""One interface for locate-and-edit methods, and the registry :data:`EDITORS` of them.

A locate-and-edit method treats an MLP's down-projection ``W_out`` as a linear associative memory and writes
facts into it (Yan et al., "Keys to Robust Edits", Sec. 3-4). Whatever the method, keyscope asks three things
of it, and nothing else:

* **compute** the edit of one or many :class:`~keyscope.editing.request.EditRequest` on the model as it is now, leaving
  its weights unchanged (:meth:`Editor.compute`; a method that adapts another one's edit, as REP adapts
  ROME's, also takes that edit: :meth:`Editor.adapt`);
* **apply** it reversibly (:meth:`ModelEdit.applied`, a context manager that restores every touched weight
  bit-exactly and removes every hook on exit, also on an exception);
* report its **edit strength** on any key (:meth:`ModelEdit.strength`): the fraction of the edit a key
  ``k`` of an edited layer receives, ``s(k) = kᵀC⁻¹k* / k*ᵀC⁻¹k*`` for ROME (Lemma 4.1; the adapted key
  ``k̂`` under REP, Lemma 4.6), per request and per layer for batch editors; and, for the lemma checks
  (:mod:`keyscope.evaluation.bounds`), the value ``Δv*`` the edit writes at a request's own keys
  (:meth:`ModelEdit.value_direction`), the keys it was computed at (:meth:`ModelEdit.own_keys`) and its
  **combined strength** over every edited layer (:meth:`ModelEdit.combined_strength`, below).

Combined strength of a multi-layer edit
---------------------------------------
Let request ``i``'s edit change ``W_out`` of layers ``l`` by ``ΔW_l`` and write, at the request's own keys
``k_{i,l}`` (those the edit was computed at), ``Δv* = Σ_l ΔW_l k_{i,l}`` (its share of it for a batch edit:
``Σ_l c_{i,l}(k_{i,l}) R_l[:, i]`` for MEMIT; ``v* − W k*`` for ROME). By Lemma 4.1 at each layer, keys
``{l: k_l}`` receive ``Σ_l s_l(k_l) ΔW_l k_{i,l}``, whose projection on ``Δv*`` in units of ``Δv*`` is::

    α({k_l}) = Σ_l w_l s_l(k_l),     w_l = (ΔW_l k_{i,l})ᵀ Δv* / ‖Δv*‖²,     Σ_l w_l = 1

(:meth:`ModelEdit.layer_weights`). For a one-layer edit ``w = 1`` and ``α`` is ``s(k)``, ROME's strength.

An :class:`Editor` is built from the :class:`EditContext` of a run (the edit layer, its covariance, each
method's config by name, and what the methods prepared once: the context prefixes, REP's gate negatives), which
the caller prepares once with :func:`prepare_context`; each editor declares its config's name and prepares its
own part (:meth:`Editor.prepare`). An edit with a gate on the keys (REP's, around any base edit) is a
:class:`GatedEdit`. The registry maps a method's name to its editor class; adding a method is one module with its
editor and one line in :data:`EDITORS`. Evaluation, the lemma checks, the experiments and the CLI
know methods only through it; :mod:`keyscope.editing.checks` holds every entry to this contract (the editor
conformance suite, ``tests/editing/test_editor_conformance.py``).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import torch

from keyscope._infra.errors import KeyscopeError
from keyscope.model.models import W_out, check_layer

__all__ = ["EDITORS", "Editor", "ModelEdit", "GatedEdit", "EditContext", "RunInputs", "prepare_context", "make_editor",
           "editor_class", "UnknownMethod", "restoring"]


class UnknownMethod(KeyscopeError):
    """A method name that is not in :data:`EDITORS`."""


# ---------------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class RunInputs:
    """What a method may read to prepare a run (:meth:`Editor.prepare`): the ``model`` (a bridge), the edit
    ``layer``, the run's ``facts`` and ``corpus`` (for gate negatives and the like), ``n_corpus_negatives``, the
    ``seed`` and the ``batch_size`` of key collection."""

    model: object
    layer: int
    facts: Sequence = ()
    corpus: object = None
    n_corpus_negatives: int = 512
    seed: int = 0
    batch_size: int = 32


@dataclass(frozen=True)
class EditContext:
    """What every editor of a run shares: the edit ``layer`` and its key covariance ``cov``; each method's config
    by the name its editor declares (:attr:`Editor.config_name`: ``configs["rome"]`` a ROMEConfig, ``["rep"]`` a
    REPConfig, ``["memit"]`` a MEMITConfig, …); what the methods prepared once for the run (``prepared``, by name:
    ``"prefixes"``, the context prefixes of ROME's ``k*`` average, which every run has, and e.g. REP's
    ``"gate_negatives"``); the ``batch_size`` of key collection and scoring. ``covariance(L)`` gives the
    covariance of another layer (batch editors over a range of layers) through ``load_covariance``, once per
    layer. Built by :func:`prepare_context`."""

    layer: int
    cov: object  # KeyCovariance of `layer`
    configs: Mapping[str, object] = field(default_factory=dict)
    prepared: Mapping[str, object] = field(default_factory=dict)
    batch_size: int = 32
    load_covariance: Callable[[int], object] | None = field(default=None, repr=False, compare=False)
    _covariances: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The run's context prefixes (``("",)``: the bare prompt only, when none were prepared)."""
        return tuple(self.prepared.get("prefixes", ("",)))

    def config(self, name: str):
        """The config named ``name`` (:attr:`Editor.config_name`) of this run."""
        if name not in self.configs:
            raise KeyscopeError(f"this run has no {name} config (it has: {', '.join(self.configs) or 'none'}); "
                                "prepare the context with the method that uses it")
        return self.configs[name]

    def with_config(self, name: str, config) -> EditContext:
        """The same context with config ``name`` replaced by ``config`` (what was prepared is kept)."""
        return replace(self, configs={**self.configs, name: config}, _covariances=self._covariances)

    def settings(self) -> dict:
        """The configs of the run, for a result's JSON: ``{"rome_config": …, "rep_config": …, …}``."""
        return {f"{name}_config": asdict(config) for name, config in self.configs.items()}

    def covariance(self, layer: int):
        """The key covariance of ``layer`` (``cov`` for the edit layer)."""
        if layer == self.layer:
            return self.cov
        if layer not in self._covariances:
            if self.load_covariance is None:
                raise KeyscopeError(f"no covariance of layer {layer} in this run (only of layer {self.layer})")
            self._covariances[layer] = self.load_covariance(layer)
        return self._covariances[layer]


#: The method every run prepares whatever its methods: its context prefixes are the run's
#: (:attr:`EditContext.prefixes`), which evaluation reads for every method (REP's anchors, near twins).
PREFIX_METHOD = "rome"


def _preparation_order(methods: Sequence[str]) -> list[str]:
    """:data:`PREFIX_METHOD`, then each method after the method it adapts (:attr:`Editor.base`), each once."""
    order: list[str] = []

    def add(name: str) -> None:
        base = editor_class(name).base
        if base is not None:
            add(base)
        if name not in order:
            order.append(name)

    for name in (PREFIX_METHOD, *methods):
        add(name)
    return order


def prepare_context(model, layer: int, cov, methods: Sequence[str] = ("rome",), facts: Sequence = (), corpus=None,
                    configs: Mapping[str, object] | None = None, n_corpus_negatives: int = 512, seed: int = 0,
                    batch_size: int = 32, load_covariance: Callable[[int], object] | None = None) -> EditContext:
    """The :class:`EditContext` of a run of ``methods``: each method (and the one it adapts, and
    :data:`PREFIX_METHOD`) prepares its config, unless ``configs`` gives it by name, and what it shares across the
    run (:meth:`Editor.prepare`: ROME's context prefixes, REP's gate negatives from ``facts`` and ``corpus``,
    …), found through the registry: this module imports no method. ``model``: a bridge or a Hugging Face model
    (:func:`keyscope.model.models.as_bridge`)."""
    from keyscope.model.models import as_bridge

    model = as_bridge(model)
    run = RunInputs(model, layer, tuple(facts), corpus, n_corpus_negatives, seed, batch_size)
    configs = {name: config for name, config in (configs or {}).items() if config is not None}
    prepared: dict[str, object] = {}
    for name in _preparation_order(methods):
        editor_class(name).prepare(run, configs, prepared)
    return EditContext(layer, cov, configs, prepared, batch_size, load_covariance)


# ---------------------------------------------------------------------------------------------- weights


@contextmanager
def restoring(model, layers: Sequence[int]) -> Iterator:
    """Copy ``W_out`` of each of ``layers`` on entry and copy it back on exit, bit-exactly, also when the block
    raises: whatever the block writes into those weights is undone (:func:`keyscope.editing.rome.applied`, MEMIT's edits)."""
    saved = {layer: W_out(model, check_layer(model, layer)).clone() for layer in sorted(set(layers))}  # (d_model, d_mlp) each
    try:
        yield model
    finally:
        for layer, original in saved.items():
            W_out(model, layer).copy_(original)


# ---------------------------------------------------------------------------------------------- interface


class ModelEdit(ABC):
    """An edit computed by an :class:`Editor` for ``requests``: what it writes (``layers``), how to apply it
    reversibly, and how much of it reaches any key."""

    #: The requests written, in order.
    requests: tuple
    #: The layers whose ``W_out`` (or keys) the edit changes.
    layers: tuple[int, ...]
    #: Whether the edit has a gate whose threshold τ can be changed at application (a :class:`GatedEdit`).
    gated: ClassVar[bool] = False

    @abstractmethod
    def applied(self, model, tau: float | None = None, upto: int | None = None) -> AbstractContextManager:
        """Apply the edit inside a ``with`` block (only its layers before ``upto``, if given); on exit every
        touched weight is restored bit-exactly and every hook removed, also when the block raises. ``tau`` is the
        gate threshold of a gated edit."""

    @abstractmethod
    def strength(self, keys: torch.Tensor, layer: int | None = None, request: int = 0,
                 tau: float | None = None) -> torch.Tensor:
        """The edit strength of request ``request`` on keys ``(..., d_mlp)`` of ``layer`` (default: the only or
        last edited layer): ``(...,)``; 1 means the key receives the edit as fully as ``k*`` does."""

    def value_direction(self, request: int = 0) -> torch.Tensor:
        """``Δv*`` ``(d_model,)``: what the edit of request ``request`` adds to the summed MLP outputs of its edited
        layers at the request's own keys (module docstring)."""
        raise KeyscopeError(f"{type(self).__name__} does not state the value it writes (no value_direction); "
                            "the lemma checks need it")

    def own_keys(self, request: int = 0) -> dict[int, torch.Tensor]:
        """``{l: k_{i,l}}`` ``(d_mlp,)`` each: the keys of request ``request`` the edit was computed at, one per edited
        layer (module docstring): where it writes ``Δv*``, so that an ungated edit's :meth:`strength` and
        :meth:`combined_strength` are 1 there (:mod:`keyscope.editing.checks`)."""
        raise KeyscopeError(f"{type(self).__name__} does not state the keys it was computed at (no own_keys)")

    def layer_weights(self, request: int = 0) -> dict[int, float]:
        """``{l: w_l}``: the share of ``Δv*`` (along it) each edited layer writes, summing to 1 (module
        docstring); ``{layer: 1}`` for an edit of one layer."""
        if len(self.layers) != 1:
            raise KeyscopeError(f"{type(self).__name__} edits layers {list(self.layers)} but states no layer weights")
        return {self.layers[0]: 1.0}

    def combined_strength(self, keys_by_layer: Mapping[int, torch.Tensor], request: int = 0,
                          tau: float | None = None) -> torch.Tensor:
        """``α = Σ_l w_l s_l(k_l)`` ``(...,)`` for keys ``{l: (..., d_mlp)}`` of every edited layer (module docstring:
        the projection on ``Δv*``, in its units, of what the edit writes at those keys, Lemma 4.1 summed over the
        layers); ``s(k)`` for an edit of one layer."""
        total = None
        for layer, weight in self.layer_weights(request).items():
            if layer not in keys_by_layer:
                raise KeyscopeError(f"the combined strength needs the keys of layer {layer}")
            term = weight * self.strength(keys_by_layer[layer], layer, request, tau)  # (...,)
            total = term if total is None else total + term
        return total

    def request_edit(self, request: int, layer: int | None = None):
        """Request ``request``'s share of the edit at ``layer`` seen as a single-key edit: an object with
        ``request``, ``layer``, ``k_star`` ``(d_mlp,)``, ``key_selector`` ``(d_mlp,)`` with ``strength(k) = kᵀ
        key_selector`` (1 at ``k_star``), the context ``prefixes`` and ``prefix_keys`` (what a key adaptor such as
        REP is fitted to, :class:`keyscope.editing.rep.SingleKeyEdit`)."""
        raise KeyscopeError(f"{type(self).__name__} cannot be seen request by request (no request_edit)")

    def _layer(self, layer: int | None) -> int:
        if layer is None:
            return self.layers[-1]
        if layer not in self.layers:
            raise KeyscopeError(f"layer {layer} is not edited (edited: {list(self.layers)})")
        return layer


class GatedEdit(ModelEdit):
    """An edit whose effect at a position is switched on by a gate ``g(k) > τ`` on the key there (REP, Sec. 5):
    the ``base`` edit and one adaptor per request and edited layer (:meth:`request_adaptors`). ``tau`` is the
    threshold it was fitted for, which :meth:`applied` uses unless given another (Figure 7)."""

    gated: ClassVar[bool] = True
    #: The edit the gate switches.
    base: ModelEdit
    #: The threshold of the gate the edit was fitted with.
    tau: float
    #: Whether the set of positions where the gate is on decides the edited forward pass (false when the adaptor
    #: draws dropout at inference).
    gate_decides: bool = True

    @abstractmethod
    def request_adaptors(self) -> list[tuple[int, object]]:
        """``(request index, adaptor)`` of every key adaptor (one per request and edited layer), in the order they
        are applied; each adaptor has ``layer_``, ``gate(keys)`` and ``config.tau``."""

    @abstractmethod
    def gate(self, keys: torch.Tensor, layer: int | None = None, request: int = 0) -> torch.Tensor:
        """The gate probability ``g(k)`` ``(...,)`` of request ``request``'s adaptor at ``layer`` on keys
        ``(..., d_mlp)``."""

    @abstractmethod
    def gate_on(self, gate: torch.Tensor, tau: float) -> torch.Tensor:
        """Where the gate of probabilities ``gate`` is on at ``tau``."""

    def value_direction(self, request: int = 0) -> torch.Tensor:
        """The base edit's ``Δv*`` (a gate moves keys, not what is written at the request's own keys)."""
        return self.base.value_direction(request)

    def own_keys(self, request: int = 0) -> dict[int, torch.Tensor]:
        """The base edit's own keys (before any adaptor: the keys it was computed at)."""
        return self.base.own_keys(request)

    def layer_weights(self, request: int = 0) -> dict[int, float]:
        return self.base.layer_weights(request)

    @property
    def prefix_keys(self) -> torch.Tensor | None:
        """The base edit's keys of the first request behind each context prefix."""
        return self.base.prefix_keys


class Editor(ABC):
    """A locate-and-edit method configured for one run (module docstring). Subclasses set :attr:`name`, and
    :attr:`base` when they adapt another method's edit (then :meth:`adapt` does the work and :meth:`compute`
    computes the base edit first)."""

    #: The method's name in :data:`EDITORS`.
    name: ClassVar[str]
    #: The method whose edit this one adapts (``None``: it computes its own).
    base: ClassVar[str | None] = None
    #: Whether it needs the subject's in-domain probes (``probes`` of :meth:`compute`).
    uses_probes: ClassVar[bool] = False
    #: Whether it trains a gate against other subjects' and corpus keys (REP's gate negatives).
    uses_gate_negatives: ClassVar[bool] = False
    #: Whether one edit can write many requests jointly (else each request is computed on its own).
    batched: ClassVar[bool] = False
    #: Whether its edits have a gate whose threshold can be changed at application (:attr:`ModelEdit.gated`).
    gated: ClassVar[bool] = False

    def __init__(self, model, context: EditContext):
        self.model = model
        self.context = context

    #: The name of this method's config in :attr:`EditContext.configs` (``None``: it has none of its own).
    config_name: ClassVar[str | None] = None
    #: The class of that config (a frozen dataclass declared in the method's module).
    config_class: ClassVar[type | None] = None

    @classmethod
    def prepare(cls, run: RunInputs, configs: dict, prepared: dict) -> None:
        """Fill in what this method reads from the :class:`EditContext` of ``run`` and the caller did not give: its
        config ``configs[config_name]`` and what it shares across the run in ``prepared`` (:func:`prepare_context`
        calls it once per run, after the method it adapts). Nothing by default."""
        return None

    @abstractmethod
    def compute(self, requests: Sequence, probes: Sequence | None = None) -> ModelEdit:
        """The edit of ``requests`` (``EditRequest`` or CounterFact-style mappings) on the model as it is now;
        the weights are unchanged on return. ``probes`` (one :class:`~keyscope.data.perturbations.FactProbes` per
        request) are needed by methods with :attr:`uses_probes`."""

    def adapt(self, base_edit: ModelEdit, probes: Sequence | None = None) -> ModelEdit:
        """This method's edit built on ``base_edit``, the edit of :attr:`base` for the same requests."""
        raise KeyscopeError(f"the {self.name} method adapts no other method's edit")

    def _probes(self, requests: Sequence, probes: Sequence | None) -> Sequence:
        if self.uses_probes and (probes is None or len(probes) != len(requests)):
            raise KeyscopeError(f"the {self.name} method needs the probes of each request")
        return probes if probes is not None else [None] * len(requests)


# ---------------------------------------------------------------------------------------------- registry


class _Registry(Mapping):
    """Method name → editor class, imported on first use (the editors' modules import this one)."""

    def __init__(self, entries: dict[str, str]):
        self._entries = entries
        self._loaded: dict[str, type[Editor]] = {}

    def __getitem__(self, name: str) -> type[Editor]:
        if name not in self._entries:
            raise KeyError(name)
        if name not in self._loaded:
            module, _, attribute = self._entries[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


#: Every editing method keyscope knows, by name (the ``--methods`` of the CLI), in Table 1's row order.
EDITORS: Mapping[str, type[Editor]] = _Registry({
    "rome": "keyscope.editing.rome:ROMEEditor",
    "rome+rep": "keyscope.editing.rep:ROMEREPEditor",
    "memit": "keyscope.editing.memit:MEMITEditor",
    "memit+rep": "keyscope.editing.rep:MEMITREPEditor",
})


def editor_class(name: str) -> type[Editor]:
    """The editor class of method ``name``; :class:`UnknownMethod` names the known ones."""
    if name not in EDITORS:
        raise UnknownMethod(f"unknown method {name!r}; choose from {', '.join(EDITORS)}")
    return EDITORS[name]


def make_editor(name: str, model, context: EditContext) -> Editor:
    """The editor of method ``name`` for a run with ``context``, on ``model``: a TransformerLens 4 bridge or a Hugging
    Face ``PreTrainedModel`` (wrapped once, :func:`keyscope.model.models.as_bridge`)."""
    from keyscope.model.models import as_bridge

    return editor_class(name)(as_bridge(model), context)


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` as a tuple, each checked against :data:`EDITORS` (one line naming the unknown ones)."""
    unknown = [m for m in methods if m not in EDITORS]
    if unknown:
        raise UnknownMethod(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(EDITORS)}")
    if not methods:
        raise UnknownMethod(f"no method given; choose from {', '.join(EDITORS)}")
    return tuple(methods)
