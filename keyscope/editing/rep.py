"""REP: a gated low-rank adaptor on the keys that carries an edit to the subject's other keys
(Yan et al., "Keys to Robust Edits", Sec. 5 and Algorithm 1).

A ROME edit reaches a key ``k`` in proportion to its edit strength ``α(k) = kᵀC⁻¹k* / k*ᵀC⁻¹k*``
(Lemma 4.1); rephrased, shuffled and long-context keys of the edited subject often have small ``α``
(Figure 3), so the edit does not reach them (Lemma 4.6). REP adds a learned correction to the layer-``L``
keys (hook ``blocks.{L}.mlp.hook_post``, the input of ``W_out``) before the edited ``W_out`` reads them::

    k̂ = k + g(k) · P(k),    g(k) = σ(Linear(GELU(Linear(k, d → ⌊0.1·d⌋)), → 1)),
                            P(k) = Linear(Linear(Dropout(k), d → r), r → d)   (r = 32)

with the second projection initialised to zero, so an untrained adaptor is the identity. At inference the
gate is binary: the branch is on where ``g(k) > τ`` (default 0.9; ``g ≥ τ`` without ``gate_strict``), off
(``k̂ = k`` exactly) elsewhere, and dropout is off (unless ``dropout_at_inference``).

Training (Algorithm 1) uses the keys the adaptor will see: those of the model without the edit at layer ``L``
and above, which the edit of layer ``L`` does not change (``W_out`` of layer ``L`` reads the keys; it does not
produce them) — for a multi-layer base edit, with its earlier layers and their adaptors applied:

* **positives** ``k_s``: keys of the same subject under rephrased subjects, shuffled subject tokens, long
  preceding contexts and other prompt templates — the in-domain half of each kind;
* **anchors**: the bare edit prompt's key, kept unchanged (``50000 ·`` its mean squared change, the released
  code's; ``anchor="prefixes"`` adds its prefixed keys, whose mean is ``k*``);
* objective ``"paper"``: maximise ``|(k̂_s/‖k̂_s‖)ᵀ C⁻¹k*|`` (a looser reading of the released code,
  which has no ``|·|``: see below) plus the anchor term; objective
  ``"strength"`` (keyscope's default): ``(α(k̂_s) − 1)²``, i.e.
  make each positive key receive exactly the edit ``k*`` receives — the normalised objective is blind to
  ``‖k̂_s‖``, so it can point a key at ``C⁻¹k*`` and still leave ``α`` far from 1;
* **gate negatives** (keyscope's default; the released code had none, so its gate was trained only by the
  objective and nothing kept it off elsewhere): keys of other subjects — the most similar to ``k*`` first
  (largest ``α``) plus random ones — keys of unrelated corpus text, and keys at the template and context
  positions of the training prompts, with a class-balanced binary cross-entropy that pushes ``g`` to 1 on
  positives and anchors and to 0 on negatives.

The released code also never trained on long contexts (its long texts had no subject slot and were
filtered out) and left dropout on at test time; :meth:`REPConfig.paper` approximates those choices (10 Adam
steps at lr 5e-4, the normalised objective, no long contexts, no gate negatives, dropout at inference) on
keyscope's data and adaptor, the default fixes them.

The released code's setting, exactly
------------------------------------
:meth:`REPConfig.released` is the setting of the released code (ElliottYan/RobustKeyEdit,
``EasyEditOurs/easyeditor/models/aggregator.py`` run by ``scripts/edit_llama.sh``; each field is cited to
file and line in the method). Per step ``t`` (10 Adam steps at lr 5e-4), with ``u = C⁻¹k̄ / ‖C⁻¹k̄‖`` —
ROME's left vector (``rome/compute_u.py`` L123-127, ``k̄`` the prefix-averaged key), which ``rome_main.py``
L48, L70 passes to the aggregator as its target vector; :attr:`keyscope.editing.rome.RankOneEdit.key_selector` has its
direction:

* **positives**: the original subject behind every ROME context prefix but the bare one, and the in-domain
  rephrased subjects and token shuffles behind every prefix (the released code: the first half of each list);
  no paraphrase templates, word shuffles or long contexts;
* a **mini-batch** ``B_t`` of 15 of them (:func:`minibatches`), plus the bare edit prompt's key ``k_a`` as
  the only anchor;
* ``k̂ = k + g(k) · B A Dropout(k)`` with no biases in ``A`` (``d → 32``, PyTorch's Kaiming-uniform
  initialisation) and ``B`` (``32 → d``, zeros), and no input scaling;
* ``loss_t = −mean_{k ∈ B_t} (k̂/‖k̂‖)ᵀu  +  50000 · mean_j (k̂_a − k_a)_j²`` — the objective without
  ``|·|`` ("v5: remove abs"), the anchor a mean squared error over the ``d_mlp`` coordinates;
* at inference the branch is on where ``g(k) > τ`` (strictly) and dropout stays on.

:func:`adapted` puts a fitted adaptor on a model inside a ``with`` block; :class:`REPEdit` holds a base edit (ROME's,
MEMIT's) and its adaptors, and its ``applied`` applies them together and removes both on exit (weights restored
bit-exactly, the hooks removed), also on an exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch

from keyscope._infra import published
from keyscope._infra.errors import InvalidKeys, KeyscopeError, NotFitted
from keyscope.analysis.keys import collect_context_keys, collect_keys
from keyscope.analysis.scan import sample_corpus_keys
from keyscope.analysis.similarity import probe_keys
from keyscope.data.perturbations import KINDS, LONG, TEMPLATE, Probe
from keyscope.editing.base import Editor, GatedEdit, ModelEdit, RunInputs, editor_class
from keyscope.editing.prefixes import prefixed, prefixed_keys
from keyscope.editing.request import EditRequest
from keyscope.model.models import check_layer, key_hook

__all__ = ["REPConfig", "KeyAdaptor", "REP", "REPKeys", "gather_keys", "training_positives", "behind_prefixes",
           "minibatches", "check_keys", "SingleKeyEdit", "adapted", "recorded_gates", "REPEdit", "GateNegatives", "REPEditor", "ROMEREPEditor", "MEMITREPEditor", "OBJECTIVES", "ANCHORS",
           "ANCHOR_LOSSES", "SETTINGS"]

#: ``strength``: ``(α(k̂) − 1)²``; ``paper``: ``−|α(k̂)| / ‖k̂‖`` (scaled); ``released``: ``−(k̂/‖k̂‖)ᵀu``.
OBJECTIVES = ("strength", "paper", "released")
#: ``prefixes``: the edit prompt behind every context prefix; ``bare``: the bare edit prompt only.
ANCHORS = ("prefixes", "bare")
#: ``relative``: ``mean_a ‖k̂_a − k_a‖² / ‖k_a‖²``; ``mse``: ``mean_{a,j} (k̂_a − k_a)_j²``.
ANCHOR_LOSSES = ("relative", "mse")
#: Named settings (``--rep-setting``): keyscope's default, :meth:`REPConfig.paper`, :meth:`REPConfig.released`.
SETTINGS = ("keyscope", "paper", "released")
#: Probe kinds REP may train on: the perturbation kinds and the paraphrase templates.
POSITIVE_KINDS = (*KINDS, TEMPLATE)


@dataclass(frozen=True)
class REPConfig:
    """Architecture, training and inference settings of the adaptor. ``REPConfig()`` is keyscope's
    default; :meth:`released` is the released code's setting, exactly; :meth:`paper` a looser approximation
    of it on keyscope's data and adaptor. No I/O.

    Training data: ``positive_kinds`` (``None``: every kind given) selects the probes REP trains on,
    ``positive_prefixes`` puts each of them (and the original subject) behind every ROME context prefix,
    ``anchor`` chooses the anchors (the edit prompt behind every prefix, or the bare prompt alone).
    Objective: ``loss = objective + anchor_weight · anchor_term (+ gate_weight · BCE)``, the anchor term by
    ``anchor_loss``; ``batch_size`` (``None``: every positive each step) draws mini-batches with
    :func:`minibatches`. Adaptor: ``bias`` on the low-rank projection, ``input_scaling`` (keys scaled by
    ``1 / RMS`` of the training keys before the gate and projection), ``gate_strict`` (on where ``g > τ``
    rather than ``g ≥ τ``).
    """

    rank: int = 32
    gate_hidden_fraction: float = 0.1  # gate hidden width ⌊0.1 · d_mlp⌋
    dropout: float = 0.1
    tau: float = 0.9  # the gate threshold at inference
    lr: float = 2e-3
    steps: int = 150
    objective: str = "strength"
    anchor_weight: float = 50000.0  # the released code's (edit_llama.sh L32, L45)
    gate_weight: float = 1.0
    gate_negatives: bool = True
    train_long_context: bool = True
    dropout_at_inference: bool = False
    n_similar_negatives: int = 32  # other subjects with the largest α to k*
    n_random_negatives: int = 32  # other subjects drawn at random
    n_context_negatives: int = 8  # template/context positions per training prompt
    seed: int = 0
    # The fields below default to the released code's choices (hparams/rep.json cites each); the alternatives
    # keyscope tried are ablation variants ("tried" rows), and docs/departures.md gives what each measured.
    anchor: str = "bare"
    anchor_loss: str = "mse"
    batch_size: int | None = 15  # None: every positive at every step
    bias: bool = False  # biases on the low-rank projection (the gate always has them)
    gate_strict: bool = True  # the branch is on where g > τ (True) or g ≥ τ (False)
    input_scaling: bool = False
    positive_kinds: tuple[str, ...] | None = None  # None: every probe kind given
    positive_prefixes: bool = False  # positives behind every ROME context prefix

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {self.objective!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, not {self.anchor!r}")
        if self.anchor_loss not in ANCHOR_LOSSES:
            raise ValueError(f"anchor_loss must be one of {ANCHOR_LOSSES}, not {self.anchor_loss!r}")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must be in (0, 1), not {self.tau}")
        if self.rank < 1 or self.steps < 0 or self.lr <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("rank must be >= 1, steps >= 0, lr > 0 and dropout in [0, 1)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be None or >= 1, not {self.batch_size}")
        if self.positive_kinds is not None:
            if isinstance(self.positive_kinds, str):
                raise ValueError("positive_kinds must be a tuple of kinds, not a string")
            unknown = [k for k in self.positive_kinds if k not in POSITIVE_KINDS]
            if unknown:
                raise ValueError(f"positive_kinds must be among {POSITIVE_KINDS}, not {unknown}")
            object.__setattr__(self, "positive_kinds", tuple(self.positive_kinds))

    @classmethod
    def paper(cls, **overrides) -> REPConfig:
        """An approximation of the released REP code's setting on keyscope's data and adaptor: Adam at lr
        5e-4 for 10 steps on the normalised objective with ``|·|``, no long contexts, no gate negatives,
        dropout left on at test time (``--rep-setting paper``); its anchor, mini-batches and adaptor details are
        the default's, which are the released code's. :meth:`released` is the faithful one."""
        paper = SETTINGS_TABLE.entries()["paper"]  # keyscope/editing/hparams/rep.json, cited per field
        return cls(**{**paper, **overrides})

    @classmethod
    def released(cls, **overrides) -> REPConfig:
        """The released code's setting, exactly (module docstring; ``--rep-setting released``). Each field is
        cited to file and line of ElliottYan/RobustKeyEdit at 5c54348 in ``keyscope/editing/hparams/rep.json``
        (``SETTINGS_TABLE.citation("released", field)``)."""
        released = SETTINGS_TABLE.entries()["released"]  # keyscope/editing/hparams/rep.json, cited per field
        return cls(**{**released, **overrides})

    @classmethod
    def named(cls, setting: str, **overrides) -> REPConfig:
        """The named setting of :data:`SETTINGS` (``keyscope``, ``paper`` or ``released``) with ``overrides``."""
        if setting not in SETTINGS:
            raise ValueError(f"the REP setting must be one of {', '.join(SETTINGS)}, not {setting!r}")
        return {"keyscope": cls, "paper": cls.paper, "released": cls.released}[setting](**overrides)


#: REP's named settings other than keyscope's default (``paper``, ``released``): the fields they set on top of
#: :class:`REPConfig`'s defaults, read from ``keyscope/editing/hparams/rep.json`` with a citation per field.
SETTINGS_TABLE = published.load("keyscope.editing", "hparams/rep.json", "setting", [f.name for f in fields(REPConfig)])


def _linear(n_in: int, n_out: int, bias: bool, generator: torch.Generator) -> torch.nn.Linear:
    """``nn.Linear(n_in, n_out)`` with PyTorch's own initialisation (``reset_parameters``: Kaiming-uniform weight,
    ``a = √5``, bias uniform in ``±1/√n_in``) drawn from ``generator`` instead of the global generator."""
    layer = torch.nn.Linear(n_in, n_out, bias=bias, device="meta").to_empty(device="cpu")
    torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        bound = 1 / math.sqrt(n_in) if n_in > 0 else 0.0
        torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


class KeyAdaptor(torch.nn.Module):
    """``k̂ = k + g(k) · P(k)`` on keys ``(..., d_mlp)`` (module docstring). ``forward(keys, tau)`` uses
    the binary gate ``1[g > tau]`` (``1[g ≥ tau]`` when ``gate_strict`` is False); ``tau=None`` the soft gate
    ``g`` (training). The defaults are :class:`REPConfig`'s (no biases, strict gate).

    ``P(k) = up(down(Dropout(k)))``, with biases if ``bias=True``; ``down`` has PyTorch's Linear
    initialisation (Kaiming-uniform, ``a = √5``), ``up`` is zero, so an untrained adaptor is the identity.
    ``key_scale`` (a buffer, 1 by default; :class:`REP` sets it to ``1 / RMS`` of the training keys unless
    ``input_scaling`` is off) scales the keys before the gate and the projection only, so the same learning
    rate suits models whose keys differ in size by orders of magnitude; the output ``P(k)`` is in key units.
    Dropout draws from the adaptor's own generator (seeded ``seed + 1``), one ``torch.rand`` of the input's
    shape per call, keeping an entry where it is ``≥ dropout``; so training and (with
    ``dropout_at_inference``) inference are deterministic.
    """

    def __init__(self, d_mlp: int, rank: int = 32, gate_hidden_fraction: float = 0.1, dropout: float = 0.1,
                 seed: int = 0, bias: bool = False, gate_strict: bool = True):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        hidden = max(1, math.floor(gate_hidden_fraction * d_mlp))
        self.gate = torch.nn.Sequential(_linear(d_mlp, hidden, True, generator), torch.nn.GELU(),
                                        _linear(hidden, 1, True, generator))
        self.down = _linear(d_mlp, rank, bias, generator)
        self.up = _linear(rank, d_mlp, bias, generator)
        torch.nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            torch.nn.init.zeros_(self.up.bias)
        self.dropout = dropout
        self.dropout_at_inference = False
        self.gate_strict = gate_strict
        self.register_buffer("key_scale", torch.ones(()))
        self._generator = torch.Generator().manual_seed(seed + 1)

    def gate_probability(self, keys: torch.Tensor) -> torch.Tensor:
        """``g(k)`` ``(...,)``."""
        return torch.sigmoid(self.gate(keys * self.key_scale))[..., 0]

    def gate_on(self, gate: torch.Tensor, tau: float) -> torch.Tensor:
        """The binary gate of probabilities ``gate``: ``g > tau`` with ``gate_strict``, else ``g ≥ tau``."""
        return gate > tau if self.gate_strict else gate >= tau

    def shift(self, keys: torch.Tensor) -> torch.Tensor:
        """``P(k)`` ``(..., d_mlp)``, with dropout on its input in training (or if ``dropout_at_inference``)."""
        x = keys * self.key_scale  # (..., d_mlp)
        if self.dropout > 0 and (self.training or self.dropout_at_inference):
            keep = torch.rand(x.shape, generator=self._generator) >= self.dropout  # (..., d_mlp)
            x = x * keep.to(x.device, x.dtype) / (1.0 - self.dropout)
        return self.up(self.down(x))

    def forward(self, keys: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        gate = self.gate_probability(keys)  # (...,)
        if tau is not None:
            gate = self.gate_on(gate, tau).to(keys.dtype)
            if not bool(gate.any()):
                return keys
        return keys + gate[..., None] * self.shift(keys)  # (..., d_mlp)


# ---------------------------------------------------------------------------------------------- keys


class SingleKeyEdit(Protocol):
    """What REP needs of the edit it adapts: one key ``k_star`` ``(d_mlp,)`` of ``layer`` and the
    ``key_selector`` ``(d_mlp,)`` with ``strength(k) = kᵀ key_selector`` (1 at ``k_star``), the ``request``, the
    context ``prefixes`` and the keys behind them (``prefix_keys``, or ``None``). A :class:`keyscope.editing.rome.RankOneEdit`
    is one; so is a request's share of a MEMIT layer update (:class:`keyscope.editing.memit.RequestShare`)."""

    request: EditRequest
    layer: int
    k_star: torch.Tensor
    key_selector: torch.Tensor
    prefixes: tuple[str, ...]
    prefix_keys: torch.Tensor | None

    def strength(self, key: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class REPKeys:
    """The training keys of one edit (float32, ``(n, d_mlp)`` each): ``positives`` (same subject, other
    forms), ``anchors`` (the bare edit prompt; with ``anchor="prefixes"`` also the prompt behind every context
    prefix), ``negatives`` (gate negatives)."""

    positives: torch.Tensor
    anchors: torch.Tensor
    negatives: torch.Tensor


def behind_prefixes(probes: Sequence[Probe], prefixes: Sequence[str]) -> list[Probe]:
    """Each of ``probes`` behind each of ``prefixes``, probe by probe: ROME's context template
    ``"{prefix}. {template}"`` (the probe itself for the bare prefix ``""``). A long-context probe already has
    its own preceding text and is kept once, as it is."""
    return [p if prefix == "" or p.kind == LONG else replace(p, template=prefixed(prefix, p.template))
            for p in probes for prefix in (prefixes if p.kind != LONG else ("",))]


def training_positives(probes: Sequence[Probe], config: REPConfig, prefixes: Sequence[str] = ("",)) -> list[Probe]:
    """The probes REP trains on among ``probes`` (the in-domain positives): those of
    ``config.positive_kinds`` (all by default), less the long contexts when ``config.train_long_context`` is
    off; with ``config.positive_prefixes``, each behind each of ``prefixes`` (:func:`behind_prefixes`)."""
    kept = [p for p in probes if (config.train_long_context or p.kind != LONG)
            and (config.positive_kinds is None or p.kind in config.positive_kinds)]
    return behind_prefixes(kept, prefixes) if config.positive_prefixes else kept


def gather_keys(
    model,
    edit: SingleKeyEdit,
    positives: Sequence[Probe],
    config: REPConfig,
    subject_keys: torch.Tensor | None = None,
    corpus_keys: torch.Tensor | None = None,
    batch_size: int = 32,
) -> REPKeys:
    """Collect an edit's training keys at its layer with the **unedited** model.

    ``positives`` are probes of the edited subject (the in-domain half), filtered and, with
    ``config.positive_prefixes``, put behind each of the edit's ``prefixes`` by :func:`training_positives`;
    in that case the edit prompt behind every prefix but the bare one is a positive too (the released code's
    data, :meth:`REPConfig.released`) unless those prompts are already anchors. Anchors: the edit prompt behind
    every prefix (``anchor="prefixes"``) or the bare prompt alone (``anchor="bare"``). ``subject_keys`` ``(n, d_mlp)`` are keys of *other*
    subjects, from which the ``n_similar_negatives`` with the largest ``α`` to ``k*`` and
    ``n_random_negatives`` random ones become negatives; ``corpus_keys`` are keys of unrelated text (all
    used). With ``config.gate_negatives`` off, no negatives are gathered.
    """
    layer = check_layer(model, edit.layer)
    device = edit.k_star.device
    request = edit.request
    positives = training_positives(positives, config, edit.prefixes)
    d = edit.k_star.shape[0]
    pos = probe_keys(model, positives, layer, batch_size=batch_size) if positives else torch.zeros((0, d), device=device)
    prefix_keys = edit.prefix_keys  # (n_prefixes, d_mlp), the edit prompt first
    if prefix_keys is None:
        prefix_keys = prefixed_keys(model, request, layer, edit.prefixes)
    anchors = prefix_keys
    if config.anchor == "bare":
        bare = [i for i, prefix in enumerate(edit.prefixes) if prefix == ""][:1]
        anchors = prefix_keys[bare] if bare else prefixed_keys(model, request, layer, ("",))  # (1, d_mlp)
    if config.positive_prefixes and config.anchor == "bare":  # kept unchanged as anchors otherwise
        prefixed = [i for i, prefix in enumerate(edit.prefixes) if prefix != ""]
        pos = torch.cat([prefix_keys[prefixed].to(pos.device, pos.dtype), pos])  # (n_prefixed + n_pos, d_mlp)
    negatives = [torch.zeros((0, d), device=device)]
    if config.gate_negatives:
        if subject_keys is not None and len(subject_keys):
            others = subject_keys.to(device).float()  # (n_other, d_mlp)
            strength = edit.strength(others)  # (n_other,)
            order = torch.argsort(strength, descending=True)
            similar = order[: config.n_similar_negatives]
            rest = order[config.n_similar_negatives :]
            g = torch.Generator().manual_seed(config.seed)
            random_pick = rest[torch.randperm(len(rest), generator=g)[: config.n_random_negatives].to(rest.device)]
            negatives += [others[similar], others[random_pick]]
        if corpus_keys is not None and len(corpus_keys):
            negatives.append(corpus_keys.to(device).float())
        if config.n_context_negatives:
            prompts = [request.template, *(p.template for p in positives)]
            subjects = [request.subject, *(p.subject for p in positives)]
            negatives.append(collect_context_keys(model, prompts, subjects, layer, config.n_context_negatives,
                                                  batch_size, seed=config.seed))
    return REPKeys(pos.float(), anchors.float(), torch.cat(negatives))


# ---------------------------------------------------------------------------------------------- fitting


def check_keys(keys: REPKeys, d_mlp: int) -> None:
    """Raise :class:`~keyscope._infra.errors.InvalidKeys` unless ``keys`` is a :class:`REPKeys` of 2-D tensors
    ``(n, d_mlp)`` with at least one anchor and only finite values (positives and negatives may be empty:
    the adaptor then only learns to keep the anchors)."""
    if not isinstance(keys, REPKeys):
        raise InvalidKeys(f"REP.fit takes the keys as a REPKeys (rep.gather_keys), not a {type(keys).__name__}")
    for name in ("positives", "anchors", "negatives"):
        value = getattr(keys, name)
        if not isinstance(value, torch.Tensor):
            raise InvalidKeys(f"REPKeys.{name} must be a tensor (n, d_mlp), not a {type(value).__name__}")
        if value.dim() != 2 or value.shape[1] != d_mlp:
            raise InvalidKeys(f"REPKeys.{name} has shape {tuple(value.shape)}; the edit's keys are (n, {d_mlp})")
        if not bool(torch.isfinite(value).all()):
            raise InvalidKeys(f"REPKeys.{name} holds NaN or infinite values")
    if not len(keys.anchors):
        raise InvalidKeys("REPKeys.anchors is empty: REP needs the edit prompt's key(s) to keep in place")


def _balanced_bce(logits_pos: torch.Tensor, logits_neg: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with each class weighted equally (targets 1 for positives, 0 for negatives)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = bce(logits_pos, torch.ones_like(logits_pos))
    if len(logits_neg):
        loss = loss + bce(logits_neg, torch.zeros_like(logits_neg))
    return loss


def minibatches(n: int, batch_size: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """The rows ``(≤ batch_size,)`` of each of ``steps`` mini-batches of ``n`` positives, drawn as the released
    code does (aggregator.py L217, L230-236): the rows in a random order, then consecutive batches; when the
    next batch would run past the end, the order is reshuffled and the batch is its first ``batch_size`` rows
    — and the position goes back to 0, so the following step takes those rows again. Permutations from one
    ``torch.Generator`` seeded with ``seed`` (the first, then one per reshuffle)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)  # (n,)
    index, batches = 0, []
    for _ in range(steps):
        if index + batch_size > n:
            order = order[torch.randperm(n, generator=generator)]  # (n,)
            batches.append(order[:batch_size])
            index = 0
        else:
            batches.append(order[index : index + batch_size])
            index += batch_size
    return batches


class REP:
    """The adaptor of one edit, fitted scikit-learn style: ``REP(config).fit(edit, keys)``.

    Learned attributes: ``adaptor_`` (:class:`KeyAdaptor`, frozen, eval mode), ``history_`` (per step: the
    total loss and its terms), ``layer_``. :meth:`transform` adapts keys with the binary gate,
    :meth:`strength` gives the edit strength ``α(k̂)`` of adapted keys.
    """

    def __init__(self, config: REPConfig | None = None):
        self.config = config or REPConfig()

    def fit(self, edit: SingleKeyEdit, keys: REPKeys) -> REP:
        """Train the adaptor for ``edit`` on ``keys`` (Algorithm 1): ``config.steps`` Adam steps on

        ``objective(B_t) + anchor_weight · anchor + gate_weight · BCE``

        over the positives ``B_t`` of step ``t`` (all of them, or :func:`minibatches` of ``batch_size``), with
        ``objective`` ``strength``: ``mean (α(k̂) − 1)²``; ``paper``: ``−mean |α(k̂)| · √d · RMS / ‖k̂‖``;
        ``released``: ``−mean (k̂/‖k̂‖)ᵀu``, ``u = C⁻¹k*/‖C⁻¹k*‖`` (``α(k) = kᵀ key_selector``); ``anchor``
        ``relative``: ``mean_a ‖k̂_a − k_a‖² / ‖k_a‖²``, ``mse``: ``mean_{a,j} (k̂_a − k_a)_j²``; the BCE
        (only with ``gate_negatives``) as in the module docstring. Each step runs the adaptor on ``B_t``, then
        on the anchors (so the dropout masks are drawn in that order).

        Raises :class:`~keyscope._infra.errors.InvalidKeys` for ``keys`` that are not :class:`REPKeys`, keys whose
        width is not ``d_mlp`` of the edit, no anchors, or keys that are not finite (:func:`check_keys`)."""
        cfg = self.config
        device = edit.k_star.device
        d = edit.k_star.shape[0]
        check_keys(keys, d)
        selector = edit.key_selector.to(device).float()  # (d_mlp,) C⁻¹k* / k*ᵀC⁻¹k*
        pos, anchors, neg = keys.positives.to(device), keys.anchors.to(device), keys.negatives.to(device)
        adaptor = KeyAdaptor(d, cfg.rank, cfg.gate_hidden_fraction, cfg.dropout, seed=cfg.seed, bias=cfg.bias,
                             gate_strict=cfg.gate_strict).to(device)
        reference = torch.cat([pos, anchors])  # (n, d_mlp)
        rms = reference.pow(2).mean().sqrt().clamp_min(1e-12)
        if cfg.input_scaling:
            adaptor.key_scale.fill_(1.0 / float(rms))
        direction = selector / selector.norm().clamp_min(1e-30)  # (d_mlp,) u = C⁻¹k* / ‖C⁻¹k*‖
        batches = minibatches(len(pos), cfg.batch_size, cfg.steps, cfg.seed) if cfg.batch_size and len(pos) else None
        optimiser = torch.optim.Adam(adaptor.parameters(), lr=cfg.lr)
        history: list[dict] = []
        adaptor.train()
        with torch.enable_grad():
            for step in range(cfg.steps):
                optimiser.zero_grad(set_to_none=True)
                terms = {}
                batch = pos if batches is None else pos[batches[step].to(device)]  # (n_batch, d_mlp)
                if len(batch):
                    adapted_pos = adaptor(batch)  # (n_batch, d_mlp) soft gate
                    if cfg.objective == "strength":
                        alpha = adapted_pos @ selector  # (n_batch,)
                        terms["objective"] = (alpha - 1.0).pow(2).mean()
                    elif cfg.objective == "paper":  # |(k̂/‖k̂‖)ᵀ C⁻¹k*|, up to the constant k*ᵀC⁻¹k*
                        alpha = adapted_pos @ selector  # (n_batch,)
                        terms["objective"] = -(alpha.abs() / adapted_pos.norm(dim=-1).clamp_min(1e-12)
                                               * rms * math.sqrt(d)).mean()
                    else:  # released: (k̂/‖k̂‖)ᵀu without |·|
                        unit = adapted_pos / adapted_pos.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (n_batch, d_mlp)
                        terms["objective"] = -(unit @ direction).mean()
                adapted_anchor = adaptor(anchors)  # (n_anchor, d_mlp)
                if cfg.anchor_loss == "relative":
                    terms["anchor"] = cfg.anchor_weight * (
                        (adapted_anchor - anchors).pow(2).sum(-1) / anchors.pow(2).sum(-1).clamp_min(1e-12)).mean()
                else:
                    terms["anchor"] = cfg.anchor_weight * (adapted_anchor - anchors).pow(2).mean()
                if cfg.gate_negatives:
                    gate_pos_keys = torch.cat([batch, anchors])  # (n_batch + n_anchor, d_mlp)
                    logits_pos = adaptor.gate(gate_pos_keys * adaptor.key_scale)[:, 0]  # (n,)
                    logits_neg = adaptor.gate(neg * adaptor.key_scale)[:, 0]  # (m,)
                    terms["gate"] = cfg.gate_weight * _balanced_bce(logits_pos, logits_neg)
                loss = sum(terms.values())
                loss.backward()
                optimiser.step()
                history.append({"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}})
        adaptor.eval()
        adaptor.dropout_at_inference = cfg.dropout_at_inference
        adaptor.requires_grad_(False)
        self.adaptor_ = adaptor
        self.history_ = history
        self.layer_ = edit.layer
        self.edit_ = edit
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "adaptor_"):
            raise NotFitted("this REP is not fitted yet; call fit(edit, keys) first")

    @torch.no_grad()
    def transform(self, keys: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """Adapted keys ``k̂`` with the binary gate at ``tau`` (default ``config.tau``)."""
        self._check_fitted()
        tau = self.config.tau if tau is None else tau
        return self.adaptor_(keys.float(), tau)

    @torch.no_grad()
    def gate(self, keys: torch.Tensor) -> torch.Tensor:
        """``g(k)`` for keys ``(..., d_mlp)``."""
        self._check_fitted()
        return self.adaptor_.gate_probability(keys.float())

    def strength(self, keys: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """``α(k̂) = k̂ᵀC⁻¹k* / k*ᵀC⁻¹k*`` of the adapted keys (Lemma 4.6 with REP's keys)."""
        return self.edit_.strength(self.transform(keys, tau))

    def with_tau(self, tau: float) -> REP:
        """The same fitted adaptor evaluated at another threshold (no retraining; Figure 7)."""
        self._check_fitted()
        other = REP(replace(self.config, tau=tau))
        other.adaptor_, other.history_, other.layer_, other.edit_ = self.adaptor_, self.history_, self.layer_, self.edit_
        return other


# ---------------------------------------------------------------------------------------------- applying


@contextmanager
def adapted(model, rep: REP, tau: float | None = None) -> Iterator:
    """Inside the block every layer-``rep.layer_`` key of every position is replaced by ``k̂`` (binary gate
    at ``tau``, default ``rep.config.tau``); the hook is removed on exit, also on an exception."""
    rep._check_fitted()
    tau = rep.config.tau if tau is None else tau
    adaptor = rep.adaptor_

    def hook(keys: torch.Tensor, hook) -> torch.Tensor:
        with torch.no_grad():
            return adaptor(keys.float(), tau).to(keys.dtype)  # (batch, pos, d_mlp)

    with model.hooks(fwd_hooks=[(key_hook(rep.layer_), hook)]):
        yield model


@contextmanager
def recorded_gates(reps: Sequence[REP]) -> Iterator[list[list[torch.Tensor]]]:
    """Record where each adaptor of ``reps`` switches its branch on, in every forward pass that applies it at a
    threshold inside the block (:func:`adapted`, :meth:`REPEdit.applied`, …): yields ``calls``, where
    ``calls[i]`` gets one bool CPU tensor of the keys' leading shape (``(batch, pos)`` in a forward pass) per call
    of ``reps[i]``'s adaptor, ``1[g(k) > τ]`` (:meth:`KeyAdaptor.gate_on`) of the keys ``k`` that adaptor is
    given — the keys it actually sees in that pass, after every hook before it (earlier layers' edits and
    adaptors, an earlier adaptor of the same layer). A forward pre-hook on each adaptor computes the gate again
    from the same keys (:meth:`KeyAdaptor.gate_probability`, which draws no dropout), changing nothing of the
    forward pass; a soft-gate call (``tau=None``, training) records nothing. The hooks are removed on exit,
    also on an exception. Each adaptor may be given once."""
    for r in reps:
        r._check_fitted()
    modules = [r.adaptor_ for r in reps]
    if len({id(m) for m in modules}) != len(modules):
        raise ValueError("an adaptor is given twice: its calls could not be told apart")
    calls: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = []

    def recorder(record: list[torch.Tensor]):
        def hook(module: KeyAdaptor, args: tuple, kwargs: dict) -> None:
            keys = args[0] if args else kwargs["keys"]  # (..., d_mlp)
            tau = args[1] if len(args) > 1 else kwargs.get("tau")
            if tau is not None:
                with torch.no_grad():
                    record.append(module.gate_on(module.gate_probability(keys), tau).cpu())  # (...,)
        return hook

    try:
        for module, record in zip(modules, calls):
            handles.append(module.register_forward_pre_hook(recorder(record), with_kwargs=True))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------- editor


class REPEdit(GatedEdit):
    """A base edit (ROME's, MEMIT's or any :class:`~keyscope.editing.base.ModelEdit` with ``request_edit``) and one
    fitted REP adaptor per request and edited layer (``adaptors[(request, layer)]``), applied together: the base
    edit, then the adaptors in the order they were fitted (layer by layer; adaptors of one layer compose in
    request order)."""

    def __init__(self, base: ModelEdit, adaptors: Mapping[tuple[int, int], REP]):
        if not adaptors:
            raise ValueError("a gated edit needs at least one adaptor")
        for adaptor in adaptors.values():
            adaptor._check_fitted()  # refused before anything is applied
        self.base = base
        self.adaptors = dict(adaptors)
        self.requests = base.requests
        self.layers = base.layers
        first = next(iter(self.adaptors.values()))
        self.tau = first.config.tau
        self.gate_decides = not any(a.config.dropout_at_inference for a in self.adaptors.values())

    @contextmanager
    def applied(self, model, tau: float | None = None, upto: int | None = None) -> Iterator:
        with self.base.applied(model, upto=upto), ExitStack() as stack:
            for (_, layer), adaptor in self.adaptors.items():
                if upto is None or layer < upto:
                    stack.enter_context(adapted(model, adaptor, tau))
            yield model

    def strength(self, keys: torch.Tensor, layer: int | None = None, request: int = 0,
                 tau: float | None = None) -> torch.Tensor:
        """``α(k̂)`` of the keys adapted by request ``request``'s adaptor at ``layer`` (Lemma 4.6 with REP's keys,
        :meth:`REP.strength`)."""
        return self.adaptors[(request, self._layer(layer))].strength(keys, tau)

    def request_adaptors(self) -> list[tuple[int, REP]]:
        return [(request, adaptor) for (request, _), adaptor in self.adaptors.items()]

    def gate(self, keys: torch.Tensor, layer: int | None = None, request: int = 0) -> torch.Tensor:
        return self.adaptors[(request, self._layer(layer))].gate(keys)

    def gate_on(self, gate: torch.Tensor, tau: float) -> torch.Tensor:
        return next(iter(self.adaptors.values())).adaptor_.gate_on(gate, tau)


@dataclass(frozen=True)
class GateNegatives:
    """Keys REP's gate is trained to stay off on (shared by every fact of a run): one key per subject of the
    run's facts (``subject_keys`` ``(n_subjects, d_mlp)``, named by ``subject_names``) and keys of unrelated
    corpus text (``corpus_keys`` ``(n_corpus, d_mlp)``), all of the run's layer."""

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

    @classmethod
    def collect(cls, run: RunInputs) -> GateNegatives:
        """The negatives of ``run``: the key of each distinct subject of ``run.facts`` (its own prompt) and
        ``run.n_corpus_negatives`` keys of ``run.corpus`` (:func:`keyscope.analysis.scan.sample_corpus_keys`)."""
        pool: dict[str, object] = {}
        for fact in run.facts:
            pool.setdefault(fact.subject.strip(), fact)
        subject_keys = collect_keys(run.model, [f.prompt for f in pool.values()], [f.subject for f in pool.values()],
                                    run.layer, batch_size=run.batch_size) if pool else None  # (n_subjects, d_mlp)
        corpus_keys = None
        if run.corpus is not None and run.n_corpus_negatives:
            corpus_keys = sample_corpus_keys(run.model, run.corpus, run.layer, run.n_corpus_negatives,
                                             seed=run.seed)  # (n, d_mlp)
        return cls(subject_keys, tuple(pool), corpus_keys)


class REPEditor(Editor):
    """REP around the edit of method :attr:`~keyscope.editing.base.Editor.base`: for each request and edited layer
    ``l``, an adaptor on the layer-``l`` keys fitted (:meth:`fit`) to request ``i``'s share of the edit at ``l``
    (:meth:`~keyscope.editing.base.ModelEdit.request_edit`: strength 1 at its key) on the request's in-domain probes
    (:meth:`~keyscope.data.perturbations.FactProbes.training_probes`, or a sequence of :class:`Probe`), with the keys
    collected on the model as the adaptor will see them (the base edit's layers before ``l`` and their adaptors
    applied). The run's gate negatives are keys of the run's layer
    (:attr:`~keyscope.editing.base.EditContext.layer`): they are used at that layer only (never the subjects of
    the fact's neighbourhood prompts, held out for Locality); at other layers the gate learns from the context
    negatives alone."""

    gated = True
    uses_probes = True
    uses_gate_negatives = True
    config_name = "rep"
    config_class = REPConfig

    def __init__(self, model, context):
        super().__init__(model, context)
        self.base_editor = editor_class(self.base)(model, context)
        self.config = context.config(self.config_name)
        if self.config.gate_negatives and "gate_negatives" not in context.prepared:
            raise KeyscopeError(f"REP's config trains its gate against negatives, but the context holds none: "
                                f"prepare it with {self.name} among its methods (prepare_context)")

    @classmethod
    def prepare(cls, run: RunInputs, configs: dict, prepared: dict) -> None:
        """REP's config (keyscope's :class:`REPConfig` unless given) and, when it trains its gate against negatives
        (:attr:`REPConfig.gate_negatives`), the run's :class:`GateNegatives` (once per run)."""
        configs.setdefault(cls.config_name, REPConfig())
        if configs[cls.config_name].gate_negatives and "gate_negatives" not in prepared:
            prepared["gate_negatives"] = GateNegatives.collect(run)

    def compute(self, requests: Sequence, probes: Sequence | None = None) -> REPEdit:
        probes = self._probes(requests, probes)
        return self.adapt(self.base_editor.compute(requests), probes)

    def adapt(self, base_edit: ModelEdit, probes: Sequence | None = None) -> REPEdit:
        probes = self._probes(base_edit.requests, probes)
        run_negatives = self.context.prepared.get("gate_negatives", GateNegatives())
        adaptors: dict[tuple[int, int], REP] = {}
        for layer in base_edit.layers:
            negatives = run_negatives if layer == self.context.layer else GateNegatives()
            with ExitStack() as stack:  # the keys this layer's adaptor will see: earlier layers' edits and adaptors
                stack.enter_context(base_edit.applied(self.model, upto=layer))
                for (_, earlier), adaptor in list(adaptors.items()):
                    if earlier < layer:
                        stack.enter_context(adapted(self.model, adaptor))
                for i, p in enumerate(probes):
                    adaptors[(i, layer)] = self.fit(base_edit.request_edit(i, layer), p, negatives)
        return REPEdit(base_edit, adaptors)

    def fit(self, edit: SingleKeyEdit, probes, negatives: GateNegatives | None = None) -> REP:
        """REP's adaptor for one single-key ``edit`` (:class:`SingleKeyEdit`: a ROME edit, a request's share of a MEMIT
        layer update), trained on ``probes`` and ``negatives`` (default: the run's) (module docstring)."""
        ctx = self.context
        if negatives is None:
            negatives = ctx.prepared.get("gate_negatives", GateNegatives())
        positives = probes.training_probes() if hasattr(probes, "training_probes") else list(probes)
        fact = getattr(probes, "fact", edit.request)
        keys = gather_keys(self.model, edit, positives, self.config, subject_keys=negatives.for_fact(fact),
                           corpus_keys=negatives.corpus_keys, batch_size=ctx.batch_size)
        return REP(self.config).fit(edit, keys)


class ROMEREPEditor(REPEditor):
    """ROME+REP: REP's adaptor around each request's ROME edit (:class:`REPEditor`)."""

    name = "rome+rep"
    base = "rome"


class MEMITREPEditor(REPEditor):
    """MEMIT+REP: REP's adaptors around the MEMIT edit of the requests, one per request and edited layer
    (:class:`REPEditor`)."""

    name = "memit+rep"
    base = "memit"
    batched = True
