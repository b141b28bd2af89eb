"""REP: a gated low-rank adaptor on the keys that carries an edit to the subject's other keys
(Yan et al., "Keys to Robust Edits", Sec. 5 and Algorithm 1).

A ROME edit reaches a key ``k`` in proportion to its edit strength ``α(k) = kᵀC⁻¹k* / k*ᵀC⁻¹k*``
(Lemma 4.1); rephrased, shuffled and long-context keys of the edited subject often have small ``α``
(Figure 3), so the edit does not reach them (Lemma 4.6). REP adds a learned correction to the layer-``L``
keys (hook ``blocks.{L}.mlp.hook_post``, the input of ``W_out``) before the edited ``W_out`` reads them::

    k̂ = k + g(k) · P(k),    g(k) = σ(Linear(GELU(Linear(k, d → ⌊0.1·d⌋)), → 1)),
                            P(k) = Linear(Linear(Dropout(k), d → r), r → d)   (r = 32)

with the second projection initialised to zero, so an untrained adaptor is the identity. At inference the
gate is binary: the branch is on where ``g(k) ≥ τ`` (default 0.9), off (``k̂ = k`` exactly) elsewhere, and
dropout is off.

Training (Algorithm 1) uses keys of the unedited model, which the edit does not change (``W_out`` of layer
``L`` reads the keys; it does not produce them):

* **positives** ``k_s``: keys of the same subject under rephrased subjects, shuffled subject tokens, long
  preceding contexts and other prompt templates — the in-domain half of each kind;
* **anchors**: the edit prompt's own key and its prefixed keys (whose mean is ``k*``), kept unchanged;
* objective ``"paper"``: maximise ``|(k̂_s/‖k̂_s‖)ᵀ C⁻¹k*|`` (the released code) plus the anchor term
  ``‖k̂_a − k_a‖² / ‖k_a‖²``; objective ``"strength"`` (keyscope's default): ``(α(k̂_s) − 1)²``, i.e.
  make each positive key receive exactly the edit ``k*`` receives — the normalised objective is blind to
  ``‖k̂_s‖``, so it can point a key at ``C⁻¹k*`` and still leave ``α`` far from 1;
* **gate negatives** (keyscope's default; the released code had none, so its gate was trained only by the
  objective and nothing kept it off elsewhere): keys of other subjects — the most similar to ``k*`` first
  (largest ``α``) plus random ones — keys of unrelated corpus text, and keys at the template and context
  positions of the training prompts, with a class-balanced binary cross-entropy that pushes ``g`` to 1 on
  positives and anchors and to 0 on negatives.

The released code also never trained on long contexts (its long texts had no subject slot and were
filtered out) and left dropout on at test time; :meth:`REPConfig.paper` reproduces those choices (10 Adam
steps at lr 5e-4, the normalised objective, no long contexts, no gate negatives, dropout at inference), the
default fixes them.

:func:`adapted` puts a fitted adaptor on a model inside a ``with`` block; :func:`applied` applies a ROME
edit and its adaptor together and removes both on exit (weights restored bit-exactly, the hook removed),
also on an exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from keyscope import rome
from keyscope.keys import collect_context_keys
from keyscope.models import check_layer, key_hook
from keyscope.perturbations import LONG, Probe
from keyscope.similarity import probe_keys

__all__ = ["REPConfig", "KeyAdaptor", "REP", "REPKeys", "gather_keys", "training_positives", "adapted", "applied",
           "OBJECTIVES"]

OBJECTIVES = ("strength", "paper")


@dataclass(frozen=True)
class REPConfig:
    """Architecture, training and inference settings of the adaptor. ``REPConfig()`` is keyscope's
    default; :meth:`paper` is the released code's setting. No I/O."""

    rank: int = 32
    gate_hidden_fraction: float = 0.1  # gate hidden width ⌊0.1 · d_mlp⌋
    dropout: float = 0.1
    tau: float = 0.9  # the gate threshold at inference
    lr: float = 2e-3
    steps: int = 150
    objective: str = "strength"
    anchor_weight: float = 10.0
    gate_weight: float = 1.0
    gate_negatives: bool = True
    train_long_context: bool = True
    dropout_at_inference: bool = False
    n_similar_negatives: int = 32  # other subjects with the largest α to k*
    n_random_negatives: int = 32  # other subjects drawn at random
    n_context_negatives: int = 8  # template/context positions per training prompt
    seed: int = 0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {self.objective!r}")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must be in (0, 1), not {self.tau}")
        if self.rank < 1 or self.steps < 0 or self.lr <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("rank must be >= 1, steps >= 0, lr > 0 and dropout in [0, 1)")

    @classmethod
    def paper(cls, **overrides) -> REPConfig:
        """The released REP code's setting: Adam at lr 5e-4 for 10 steps on the normalised objective, no
        long contexts, no gate negatives, dropout left on at test time."""
        paper = dict(lr=5e-4, steps=10, objective="paper", gate_negatives=False, train_long_context=False,
                     dropout_at_inference=True)
        return cls(**{**paper, **overrides})


class KeyAdaptor(torch.nn.Module):
    """``k̂ = k + g(k) · P(k)`` on keys ``(..., d_mlp)`` (module docstring). ``forward(keys, tau)`` uses
    the binary gate ``1[g ≥ tau]``; ``tau=None`` the soft gate ``g`` (training).

    ``key_scale`` (a buffer, 1 by default; :class:`REP` sets it to ``1 / RMS`` of the training keys) scales
    the keys before the gate and the projection only, so the same learning rate suits models whose keys
    differ in size by orders of magnitude; the output ``P(k)`` is in key units. Dropout draws from the
    adaptor's own seeded generator, so training and (with ``dropout_at_inference``) inference are
    deterministic.
    """

    def __init__(self, d_mlp: int, rank: int = 32, gate_hidden_fraction: float = 0.1, dropout: float = 0.1,
                 seed: int = 0):
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            hidden = max(1, math.floor(gate_hidden_fraction * d_mlp))
            self.gate = torch.nn.Sequential(torch.nn.Linear(d_mlp, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
            self.down = torch.nn.Linear(d_mlp, rank)
            self.up = torch.nn.Linear(rank, d_mlp)
        finally:
            torch.random.set_rng_state(generator_state)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)
        self.dropout = dropout
        self.dropout_at_inference = False
        self.register_buffer("key_scale", torch.ones(()))
        self._generator = torch.Generator().manual_seed(seed + 1)

    def gate_probability(self, keys: torch.Tensor) -> torch.Tensor:
        """``g(k)`` ``(...,)``."""
        return torch.sigmoid(self.gate(keys * self.key_scale))[..., 0]

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
            gate = (gate >= tau).to(keys.dtype)
            if not bool(gate.any()):
                return keys
        return keys + gate[..., None] * self.shift(keys)  # (..., d_mlp)


# ---------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class REPKeys:
    """The training keys of one edit (float32, ``(n, d_mlp)`` each): ``positives`` (same subject, other
    forms), ``anchors`` (the edit prompt and its prefixed prompts), ``negatives`` (gate negatives)."""

    positives: torch.Tensor
    anchors: torch.Tensor
    negatives: torch.Tensor


def training_positives(probes: Sequence[Probe], config: REPConfig) -> list[Probe]:
    """The probes REP trains on among ``probes`` (the in-domain positives): all of them, less the long
    contexts when ``config.train_long_context`` is off."""
    return [p for p in probes if config.train_long_context or p.kind != LONG]


def gather_keys(
    model,
    edit: rome.Edit,
    positives: Sequence[Probe],
    config: REPConfig,
    subject_keys: torch.Tensor | None = None,
    corpus_keys: torch.Tensor | None = None,
    batch_size: int = 32,
) -> REPKeys:
    """Collect an edit's training keys at its layer with the **unedited** model.

    ``positives`` are probes of the edited subject (the in-domain half; long-context probes are dropped
    when ``config.train_long_context`` is off); ``subject_keys`` ``(n, d_mlp)`` are keys of *other*
    subjects, from which the ``n_similar_negatives`` with the largest ``α`` to ``k*`` and
    ``n_random_negatives`` random ones become negatives; ``corpus_keys`` are keys of unrelated text (all
    used). With ``config.gate_negatives`` off, no negatives are gathered.
    """
    layer = check_layer(model, edit.layer)
    device = edit.k_star.device
    request = edit.request
    positives = training_positives(positives, config)
    d = edit.k_star.shape[0]
    pos = probe_keys(model, positives, layer, batch_size=batch_size) if positives else torch.zeros((0, d), device=device)
    anchors = edit.prefix_keys  # (n_prefixes, d_mlp), the edit prompt first
    if anchors is None:
        anchors = rome.prefixed_keys(model, request, layer, edit.prefixes)
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


def _balanced_bce(logits_pos: torch.Tensor, logits_neg: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with each class weighted equally (targets 1 for positives, 0 for negatives)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = bce(logits_pos, torch.ones_like(logits_pos))
    if len(logits_neg):
        loss = loss + bce(logits_neg, torch.zeros_like(logits_neg))
    return loss


class REP:
    """The adaptor of one edit, fitted scikit-learn style: ``REP(config).fit(edit, keys)``.

    Learned attributes: ``adaptor_`` (:class:`KeyAdaptor`, frozen, eval mode), ``history_`` (per step: the
    total loss and its terms), ``layer_``. :meth:`transform` adapts keys with the binary gate,
    :meth:`strength` gives the edit strength ``α(k̂)`` of adapted keys.
    """

    def __init__(self, config: REPConfig | None = None):
        self.config = config or REPConfig()

    def fit(self, edit: rome.Edit, keys: REPKeys) -> REP:
        """Train the adaptor for ``edit`` on ``keys`` (Algorithm 1; the objective and gate terms are in
        the module docstring)."""
        cfg = self.config
        device = edit.k_star.device
        d = edit.k_star.shape[0]
        selector = edit.key_selector.to(device).float()  # (d_mlp,) C⁻¹k* / k*ᵀC⁻¹k*
        pos, anchors, neg = keys.positives.to(device), keys.anchors.to(device), keys.negatives.to(device)
        adaptor = KeyAdaptor(d, cfg.rank, cfg.gate_hidden_fraction, cfg.dropout, seed=cfg.seed).to(device)
        reference = torch.cat([pos, anchors])  # (n, d_mlp)
        rms = reference.pow(2).mean().sqrt().clamp_min(1e-12)
        adaptor.key_scale.fill_(1.0 / float(rms))
        optimiser = torch.optim.Adam(adaptor.parameters(), lr=cfg.lr)
        history: list[dict] = []
        adaptor.train()
        gate_pos_keys = torch.cat([pos, anchors])  # (n_pos + n_anchor, d_mlp)
        with torch.enable_grad():
            for _ in range(cfg.steps):
                optimiser.zero_grad(set_to_none=True)
                terms = {}
                if len(pos):
                    adapted_pos = adaptor(pos)  # (n_pos, d_mlp) soft gate
                    alpha = adapted_pos @ selector  # (n_pos,)
                    if cfg.objective == "strength":
                        terms["objective"] = (alpha - 1.0).pow(2).mean()
                    else:  # |(k̂/‖k̂‖)ᵀ C⁻¹k*|, up to the constant k*ᵀC⁻¹k* (Adam is scale-free)
                        terms["objective"] = -(alpha.abs() / adapted_pos.norm(dim=-1).clamp_min(1e-12)
                                               * rms * math.sqrt(d)).mean()
                adapted_anchor = adaptor(anchors)  # (n_anchor, d_mlp)
                terms["anchor"] = cfg.anchor_weight * (
                    (adapted_anchor - anchors).pow(2).sum(-1) / anchors.pow(2).sum(-1).clamp_min(1e-12)).mean()
                if cfg.gate_negatives:
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
            raise RuntimeError("this REP is not fitted yet; call fit(edit, keys) first")

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
def applied(model, edit: rome.Edit, rep: REP | None = None, tau: float | None = None) -> Iterator:
    """ROME and REP together: apply ``edit`` to ``W_out`` (:func:`keyscope.rome.applied`) and, if ``rep``
    is given, its adaptor on the keys (:func:`adapted`); on exit both are removed — the weights restored
    bit-exactly and the hook taken off — also when the block raises."""
    with rome.applied(model, edit):
        if rep is None:
            yield model
        else:
            if rep.layer_ != edit.layer:
                raise ValueError(f"the adaptor is for layer {rep.layer_}, the edit is at layer {edit.layer}")
            with adapted(model, rep, tau):
                yield model
