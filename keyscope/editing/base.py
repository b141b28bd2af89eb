"""One interface for locate-and-edit methods, and the registry :data:`EDITORS` of them.

A locate-and-edit method treats an MLP's down-projection ``W_out`` as a linear associative memory and writes
facts into it (Yan et al., "Keys to Robust Edits", Sec. 3-4). Whatever the method, keyscope asks three things
of it, and nothing else:

* **compute** the edit of one or many :class:`~keyscope.editing.rome.EditRequest` on the model as it is now, leaving
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

An :class:`Editor` is built from the :class:`EditContext` of a run (the edit layer, its covariance, the
methods' configs, ROME's context prefixes, REP's gate negatives), which the caller prepares once with
:func:`prepare_context`. The registry maps a method's name to its editor class; adding a method is one module
with its editor and one line in :data:`EDITORS`. Evaluation, the lemma checks, the experiments and the CLI
know methods only through it; :mod:`keyscope.editing.checks` holds every entry to this contract (the editor
conformance suite, ``tests/editing/test_editor_conformance.py``).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from keyscope._infra.errors import KeyscopeError

__all__ = ["EDITORS", "Editor", "ModelEdit", "EditContext", "GateNegatives", "prepare_context", "make_editor",
           "editor_class", "UnknownMethod"]


class UnknownMethod(KeyscopeError):
    """A method name that is not in :data:`EDITORS`."""


# ---------------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class GateNegatives:
    """Keys REP's gate is trained to stay off on (shared by every fact of a run): one key per subject of the
    run's facts (``subject_keys`` ``(n_subjects, d_mlp)``, named by ``subject_names``) and keys of unrelated
    corpus text (``corpus_keys`` ``(n_corpus, d_mlp)``)."""

    subject_keys: torch.Tensor | None = None  # (n_subjects, d_mlp)
    subject_names: tuple[str, ...] = ()
    corpus_keys: torch.Tensor | None = None  # (n_corpus, d_mlp)

    def for_fact(self, fact) -> torch.Tensor | None:
        """Keys of subjects other than ``fact``'s own and those named in its neighbourhood prompts (held out for
        Locality)."""
        if self.subject_keys is None:
            return None
        neighbourhood = getattr(fact, "neighborhood_prompts", ()) or ()
        keep = [i for i, name in enumerate(self.subject_names)
                if name.strip() != fact.subject.strip() and not any(name in p for p in neighbourhood)]
        return self.subject_keys[torch.as_tensor(keep, dtype=torch.long)]


@dataclass(frozen=True)
class EditContext:
    """What every editor of a run shares: the edit ``layer`` and its key covariance ``cov``; ROME's config and
    context ``prefixes`` (sampled once per run); REP's config and gate ``negatives``; the ``batch_size`` of key
    collection and scoring. ``covariance(L)`` gives the covariance of another layer (batch editors over a
    range of layers) through ``load_covariance``, once per layer."""

    layer: int
    cov: object  # KeyCovariance of `layer`
    rome_config: object  # rome.ROMEConfig
    rep_config: object  # rep.REPConfig
    prefixes: tuple[str, ...]
    negatives: GateNegatives = field(default_factory=GateNegatives)
    batch_size: int = 32
    load_covariance: Callable[[int], object] | None = field(default=None, repr=False, compare=False)
    _covariances: dict = field(default_factory=dict, repr=False, compare=False)

    def settings(self) -> dict:
        """The editors' settings of the run, for a result's JSON: ``{"rome_config": …, "rep_config": …}``."""
        return {"rome_config": asdict(self.rome_config), "rep_config": asdict(self.rep_config)}

    def covariance(self, layer: int):
        """The key covariance of ``layer`` (``cov`` for the edit layer)."""
        if layer == self.layer:
            return self.cov
        if layer not in self._covariances:
            if self.load_covariance is None:
                raise KeyscopeError(f"no covariance of layer {layer} in this run (only of layer {self.layer})")
            self._covariances[layer] = self.load_covariance(layer)
        return self._covariances[layer]


#: The methods whose settings every run's :class:`EditContext` carries, whatever the run's methods (ROME's config
#: and context prefixes, REP's config: evaluation reads them for every method), in the order they are prepared.
CONTEXT_METHODS = ("rome", "rome+rep")


def prepare_context(model, layer: int, cov, methods: Sequence[str] = ("rome",), facts: Sequence = (), corpus=None,
                    rome_config=None, rep_config=None, n_corpus_negatives: int = 512, seed: int = 0,
                    batch_size: int = 32, load_covariance: Callable[[int], object] | None = None) -> EditContext:
    """The :class:`EditContext` of a run of ``methods``: ROME's context prefixes and, when one of the methods
    trains a gate with negatives (REP with ``gate_negatives``), the layer keys of every subject in ``facts``
    (one prompt each) and ``n_corpus_negatives`` keys of ``corpus``. The method-specific settings come from the
    editors of :data:`CONTEXT_METHODS` (:meth:`Editor.prepare`), found through the registry: this module imports
    no method. ``model``: a bridge or a Hugging Face model (:func:`keyscope.model.models.as_bridge`)."""
    from keyscope.analysis.keys import collect_keys
    from keyscope.model.models import as_bridge

    model = as_bridge(model)

    settings = {"rome_config": rome_config, "rep_config": rep_config, "prefixes": ("",)}
    for method in CONTEXT_METHODS:
        editor_class(method).prepare(model, settings)
    rome_config, rep_config, prefixes = settings["rome_config"], settings["rep_config"], settings["prefixes"]
    negatives = GateNegatives()
    if rep_config.gate_negatives and any(editor_class(m).uses_gate_negatives for m in methods):
        from keyscope.analysis.scan import sample_corpus_keys

        pool: dict[str, object] = {}
        for fact in facts:
            pool.setdefault(fact.subject.strip(), fact)
        subject_keys = collect_keys(model, [f.prompt for f in pool.values()], [f.subject for f in pool.values()],
                                    layer, batch_size=batch_size) if pool else None  # (n_subjects, d_mlp)
        corpus_keys = None
        if corpus is not None and n_corpus_negatives:
            corpus_keys = sample_corpus_keys(model, corpus, layer, n_corpus_negatives, seed=seed)  # (n, d_mlp)
        negatives = GateNegatives(subject_keys, tuple(pool), corpus_keys)
    return EditContext(layer, cov, rome_config, rep_config, tuple(prefixes), negatives, batch_size, load_covariance)


# ---------------------------------------------------------------------------------------------- interface


class ModelEdit(ABC):
    """An edit computed by an :class:`Editor` for ``requests``: what it writes (``layers``), how to apply it
    reversibly, and how much of it reaches any key."""

    #: The requests written, in order.
    requests: tuple
    #: The layers whose ``W_out`` (or keys) the edit changes.
    layers: tuple[int, ...]
    #: Whether the edit has a gate whose threshold τ can be changed at application (REP).
    gated: ClassVar[bool] = False
    #: For a gated edit: whether the set of positions where the gate is on decides the edited forward pass
    #: (false when the adaptor draws dropout at inference).
    gate_decides: bool = True

    @abstractmethod
    def applied(self, model, tau: float | None = None) -> AbstractContextManager:
        """Apply the edit inside a ``with`` block; on exit every touched weight is restored bit-exactly and
        every hook removed, also when the block raises. ``tau`` is the gate threshold of a gated edit."""

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

    def request_adaptors(self) -> list[tuple[int, object]]:
        """``(request index, adaptor)`` of every key adaptor of a gated edit (a fitted :class:`keyscope.editing.rep.REP`;
        ROME+REP: one per request, MEMIT+REP: one per request and layer), in the order they are applied; ``[]``
        for an edit without one."""
        return []

    def gate(self, keys: torch.Tensor) -> torch.Tensor:
        """The gate probability ``g(k)`` ``(...,)`` of a gated edit."""
        raise KeyscopeError(f"{type(self).__name__} has no gate")

    def gate_on(self, gate: torch.Tensor, tau: float) -> torch.Tensor:
        """Where the gate of probabilities ``gate`` is on at ``tau``."""
        raise KeyscopeError(f"{type(self).__name__} has no gate")

    def _layer(self, layer: int | None) -> int:
        if layer is None:
            return self.layers[-1]
        if layer not in self.layers:
            raise KeyscopeError(f"layer {layer} is not edited (edited: {list(self.layers)})")
        return layer


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
    #: Whether it trains a gate against other subjects' and corpus keys (:class:`GateNegatives`).
    uses_gate_negatives: ClassVar[bool] = False
    #: Whether one edit can write many requests jointly (else each request is computed on its own).
    batched: ClassVar[bool] = False
    #: Whether its edits have a gate whose threshold can be changed at application (:attr:`ModelEdit.gated`).
    gated: ClassVar[bool] = False

    def __init__(self, model, context: EditContext):
        self.model = model
        self.context = context

    @classmethod
    def prepare(cls, model, settings: dict) -> None:
        """Fill in ``settings`` (the :class:`EditContext` fields :func:`prepare_context` builds: ``rome_config``,
        ``rep_config``, ``prefixes``) with what this method's editors read from the context and the caller did not
        give; called for each of :data:`CONTEXT_METHODS`. Nothing by default."""
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
    "memit+rep": "keyscope.editing.memit:MEMITREPEditor",
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
