"""MEMIT: mass-editing many facts at once over a range of layers (Meng et al. 2023, "Mass-Editing Memory in
a Transformer"), on the same keys as ROME.

A batch of ``n`` requests is written into ``W_out`` of the layers ``ℓ_1 < … < ℓ_L`` of
:attr:`MEMITConfig.layers` (kmeng01/memit ``memit/memit_main.py``, ``execute_memit``):

1. **Targets z_i** (:func:`compute_z`, kmeng01/memit ``memit/compute_z.py``): for each request alone, a vector
   ``δ_i`` is added to the residual stream *after* the last layer ``ℓ_L`` (hook ``blocks.{ℓ_L}.hook_resid_post``,
   MEMIT's ``layer_module_tmp`` output) at the subject's last token of the prompt behind every context prefix
   and of the KL prompt, and optimised with ROME's v* objective (:func:`keyscope.editing.optimise.optimise_delta`: teacher-
   forced NLL of ``target_new``, ``kl_factor ·`` KL, the decay ``v_weight_decay · ‖δ‖ / ‖h‖²`` and the clamp
   ``‖δ‖ ≤ clamp_norm_factor · ‖h‖``), with ``h`` the unedited residual there (``target_init`` in
   compute_z.py; see "One key" below). ``z_i = h_i + δ_i``.
2. **Layer by layer** (memit_main.py's ``for i, layer in enumerate(hparams.layers)``), on the model edited at the
   layers before: ``K_l`` ``(d_mlp, n)`` are the requests' layer-``l`` keys averaged over ROME's context prefixes
   (MEMIT's ``compute_ks``; keyscope's :func:`keyscope.editing.rome.compute_k_star`), the residual is
   ``R_l = (Z − H) / (L − i)`` ``(d_model, n)`` with ``H`` the current residuals after ``ℓ_L`` (``cur_zs``,
   ``targets / (len(hparams.layers) - i)``) and the update (MEMIT eq. 14)::

       ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹          (``upd_matrix = resid @ adj_k.T``)

   ``λ`` is :attr:`MEMITConfig.mom2_update_weight` and ``C_l`` the layer's uncentred key second moment.
   MEMIT's ``C`` is ``layer_stats(...).mom2.moment()``, i.e. ``Σ k kᵀ / count`` over the tokens of its
   ``mom2_n_samples`` Wikipedia samples (``SecondMoment.moment`` in ``util/runningstats.py``), normalised per
   token exactly as :attr:`keyscope.analysis.covariance.KeyCovariance.C_` is; so the published λ applies unchanged.

The solve uses the push-through identity ``(λC + KKᵀ)⁻¹K = C⁻¹K (λI + KᵀC⁻¹K)⁻¹`` (exact for λ ≥ 0 when
``C`` and ``λI + KᵀC⁻¹K`` are invertible): ``C⁻¹K`` by keyscope's float64 Cholesky solve
(:meth:`~keyscope.analysis.covariance.KeyCovariance.solve`, whose ridge ``1e-6 · tr(C)/d`` every keyscope edit shares)
and an ``n × n`` float64 solve, instead of MEMIT's ``d_mlp × d_mlp`` ``torch.linalg.solve``. It also holds at
``λ = 0``, where ``ΔW_l K_l = R_l`` exactly (each request's key receives exactly its residual: ROME's
``W' k* = v*`` for ``n`` keys at once). The tests compare it with the dense closed form.

Each layer's update is kept as two factors ``ΔW_l = R_l A_lᵀ`` with ``A_l = (λC_l + K_lK_lᵀ)⁻¹K_l``
(:class:`LayerUpdate`); :class:`MEMITEdit` applies them reversibly (:func:`keyscope.editing.base.restoring`) and gives
the **edit strength** of request ``i`` on any key ``k`` of layer ``l`` (:meth:`MEMITEdit.strength`)::

    ΔW_l k = Σ_i R_l[:, i] · c_i(k),   c_i(k) = A_l[:, i]ᵀ k,     s_i(k) = c_i(k) / c_i(k_i)

— the share of request ``i``'s residual that ``k`` receives, relative to the share its own key ``k_i`` receives.
For one request ``A = C⁻¹k* / (λ + k*ᵀC⁻¹k*)`` and ``s(k) = kᵀC⁻¹k* / k*ᵀC⁻¹k*``: ROME's strength (Lemma 4.1).
Over all layers, request ``i`` writes ``Δv*_i = Σ_l c_i(k_{i,l}) R_l[:, i]`` at its own keys
(:meth:`MEMITEdit.value_direction`), layer ``l`` the share ``w_l`` of it (:meth:`MEMITEdit.layer_weights`), and
keys ``{l: k_l}`` receive ``α = Σ_l w_l s_{i,l}(k_l)`` of it (:meth:`~keyscope.editing.base.ModelEdit.combined_strength`,
:mod:`keyscope.editing.base`, "Combined strength of a multi-layer edit").

One key
-------
kmeng01/memit reads ``h`` (z's start) and ``H`` (``cur_zs``) on the **bare** prompt but installs the residual at
the **prefix-averaged** key ``k̄`` — the two-key mix keyscope's ROME avoids (:mod:`keyscope.editing.rome`, "One key
definition"). keyscope reads ``h`` and ``H`` averaged over the prompt behind every context prefix, the prompts δ
is optimised on: the residual after the last layer is affine in that layer's ``W_out`` update, so its average
over the prefixed prompts moves by exactly ``ΔW k̄``, and with ``λ → 0`` the last layer closes the average gap
``Z − H`` exactly. ``MEMITConfig(reference=True)`` reads them on the bare prompt, as the reference
(``docs/departures.md`` compares the two readings).

Where keyscope departs from kmeng01/memit (as its ROME does from kmeng01/rome): the context prefixes are
ROME's (:func:`keyscope.editing.prefixes.context_prefixes`, 10 of 5 and 10 of 10 tokens; MEMIT's ``get_context_templates``
samples 10 of 10 tokens from five seed words), and the KL term is read at the last position of
``"{subject} is a"`` (MEMIT reads it at the subject's last token), as in :func:`keyscope.editing.rome.compute_v_star`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch

from keyscope._infra import published
from keyscope._infra.errors import KeyscopeError
from keyscope.analysis.keys import collect_keys
from keyscope.data.prompts import locate, pad_batch
from keyscope.editing.base import Editor, ModelEdit, restoring
from keyscope.editing.optimise import DeltaConfig, EditTrace, optimise_delta, v_star_batch
from keyscope.editing.prefixes import prefixed
from keyscope.editing.request import EditRequest, as_request
from keyscope.model.capture import Site, run_to
from keyscope.model.models import (
    MODEL_CARD,
    W_out,
    check_layer,
    family,
    model_card,
    model_name,
    n_layers,
    residual_hook,
)

__all__ = ["MEMITConfig", "PUBLISHED", "subject_residuals", "compute_z", "memit_update",
           "LayerUpdate", "RequestShare", "MEMITEdit", "MEMITEditor",
           "compute_memit"]


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MEMITConfig:
    """Hyper-parameters of a MEMIT edit. ``MEMITConfig()`` holds MEMIT's GPT-2 XL values
    (kmeng01/memit ``hparams/MEMIT/gpt2-xl.json``); :meth:`for_model` the published values of a model's family
    or the model card's own. No I/O. The z optimisation is ROME's v* loop with these settings (:meth:`z_config`).

    λ is not scale-free: one request's key receives the share ``g / (λ + g)`` of its residual, ``g = k*ᵀC⁻¹k*``
    (:meth:`LayerUpdate.own`; the one-request case of MEMIT eq. 14), so a published λ suits models whose ``g`` is
    large next to it, and a model whose ``g`` is not needs its own λ: a model card sets it (``"memit_config"``;
    factworld's is chosen in ``docs/results-factworld.md``, "MEMIT")."""

    #: The edited layers, in increasing order; z is optimised after the last one.
    layers: tuple[int, ...] = (13, 14, 15, 16, 17)  # gpt2-xl.json "layers"
    #: λ of ``λ C + K Kᵀ`` (``mom2_update_weight``).
    mom2_update_weight: float = 20000.0  # gpt2-xl.json
    #: Forward evaluations of the z objective (``v_num_grad_steps``).
    v_num_grad_steps: int = 20  # gpt2-xl.json
    v_lr: float = 0.5  # gpt2-xl.json "v_lr": 5e-1
    #: ``v_weight_decay · ‖δ‖ / ‖h‖²`` (compute_z.py's form).
    v_weight_decay: float = 0.5  # gpt2-xl.json
    #: ``‖δ‖ ≤ clamp_norm_factor · ‖h‖`` with ``h`` the residual at the bare prompt (compute_z.py ``max_norm``).
    clamp_norm_factor: float = 0.75  # gpt2-xl.json
    kl_factor: float = 0.0625  # gpt2-xl.json
    kl_prompt: str = "{} is a"  # compute_z.py kl_prompts
    #: ``if loss < 5e-2: break`` (compute_z.py).
    early_stop_loss: float | None = 5e-2
    #: Counted tokens of each layer's C when the caller estimates it (``mom2_n_samples: 100000``).
    covariance_tokens: int = 100_000
    #: Read the residuals ``h`` (z's start, ``cur_zs``) at the bare prompt, as kmeng01/memit does, instead of
    #: keyscope's one key: their mean over the prompt behind every context prefix (module docstring).
    reference: bool = False

    def __post_init__(self):
        layers = tuple(int(layer) for layer in self.layers)
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be a non-empty increasing sequence, not {self.layers}")
        object.__setattr__(self, "layers", layers)
        if self.mom2_update_weight < 0:
            raise ValueError(f"mom2_update_weight must be >= 0, not {self.mom2_update_weight}")
        DeltaConfig(**self._z_fields())  # validates the z settings

    def _z_fields(self) -> dict:
        return dict(v_num_grad_steps=self.v_num_grad_steps, v_lr=self.v_lr, v_weight_decay=self.v_weight_decay,
                    clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor, kl_prompt=self.kl_prompt,
                    early_stop_loss=self.early_stop_loss)

    def z_config(self, base: DeltaConfig | None = None) -> DeltaConfig:
        """The settings of the δ loop (:func:`keyscope.editing.optimise.optimise_delta`, ROME's v* loop) with MEMIT's
        z settings; ``early_stop_probability`` and ``reference`` (the tokenisation's BOS convention) from ``base``,
        the run's ROME config (default: none, and the bridge's own BOS convention)."""
        return DeltaConfig(**self._z_fields(), early_stop_probability=getattr(base, "early_stop_probability", None),
                           reference=getattr(base, "reference", False))

    @classmethod
    def for_model(cls, model, **overrides) -> MEMITConfig:
        """The MEMIT hyper-parameters for ``model``, each field from the first of: ``overrides``; the model card's
        ``"memit_config"`` (factworld's sets its own layers, λ and z steps); the published file of its family
        (:data:`PUBLISHED`); MEMIT's GPT-2 XL values. Raises :class:`KeyscopeError` when the layers do not exist
        in ``model``."""
        own = dict(model_card(model).get("memit_config", {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(own) - known)
        if unknown:
            raise KeyscopeError(f"the memit_config of {MODEL_CARD} has unknown fields {unknown}")
        values = {**PUBLISHED.get(family(model), {}), **own, **overrides}
        if "layers" in values:
            values["layers"] = tuple(values["layers"])
        config = replace(cls(), **values)
        depth = n_layers(model)
        if config.layers[-1] >= depth:
            raise KeyscopeError(f"MEMIT's layers {list(config.layers)} do not exist in {model_name(model)} "
                                f"({depth} layers); give layers that do")
        return config


#: Published MEMIT hyper-parameters per HF ``model_type``, each cited in ``keyscope/editing/hparams/memit.json``
#: (table ``family``; :data:`PUBLISHED_TABLE` gives the citations).
PUBLISHED_TABLE = published.load("keyscope.editing", "hparams/memit.json", "family",
                                 [f.name for f in fields(MEMITConfig)])
PUBLISHED: dict[str, dict] = PUBLISHED_TABLE.entries()


# ---------------------------------------------------------------------------------------------- residuals


def subject_residuals(model, requests: Sequence[EditRequest], layer: int, batch_size: int = 32,
                      prefixes: Sequence[str] = ("",)) -> torch.Tensor:
    """The residual after block ``layer`` at the subject's last token of each request's prompt, averaged over the
    prompt behind each of ``prefixes`` (``""``: the bare prompt alone, MEMIT's ``cur_zs`` from
    ``get_module_input_output_at_words``): ``(n, d_model)`` float32. Forward passes stop after block ``layer``."""
    layer = check_layer(model, layer)
    tokenizer = model.tokenizer
    located = [locate(tokenizer, prefixed(prefix, r.template), r.subject) for r in requests for prefix in prefixes]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for lo in range(0, len(located), batch_size):
        chunk = located[lo : lo + batch_size]
        input_ids, mask = pad_batch([enc.ids for enc, _ in chunk], pad_id, device=model.cfg.device)  # (batch, pos)
        rows, index = torch.arange(len(chunk)), torch.as_tensor([i for _, i in chunk])  # (batch,) each
        site = Site(residual_hook(layer),
                    lambda h, rows=rows, index=index: h.detach()[rows, index].float())  # (batch, d_model)
        with torch.no_grad():
            out.append(run_to(model, input_ids, [site], mask)[site.name])
    return torch.cat(out).reshape(len(requests), len(prefixes), -1).mean(1)  # (n, d_model)


def _h_prefixes(prefixes: Sequence[str], config: MEMITConfig) -> tuple[str, ...]:
    """The prompts ``h`` is read at: the bare one (reference) or every prefixed one (keyscope's one key)."""
    return ("",) if config.reference else tuple(prefixes)


def compute_z(model, request: EditRequest, layer: int, prefixes: Sequence[str], config: MEMITConfig,
              base: DeltaConfig | None = None) -> tuple[torch.Tensor, EditTrace]:
    """``z = h + δ`` ``(d_model,)``: the target residual after block ``layer`` at the subject's last token
    (kmeng01/memit ``memit/compute_z.py``), ``δ`` optimised by ROME's v* loop
    (:func:`keyscope.editing.optimise.optimise_delta`) at :func:`keyscope.model.models.residual_hook` with ``‖h‖`` scaling the decay and clamp,
    ``h`` the unedited residual (compute_z.py's ``target_init``: on the bare prompt; keyscope: averaged over the
    prefixed prompts, unless ``config.reference``)."""
    start = time.perf_counter()
    z_config = config.z_config(base)
    h = subject_residuals(model, [request], layer, prefixes=_h_prefixes(prefixes, config))[0]  # (d_model,)
    batch = v_star_batch(model, request, prefixes, z_config)
    delta, trace = optimise_delta(model, batch, residual_hook(layer), float(h.norm()), z_config)
    return h + delta, replace(trace, seconds_v_star=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- update


def memit_update(keys: torch.Tensor, cov, mom2_update_weight: float) -> torch.Tensor:
    """``A = (λC + KKᵀ)⁻¹K`` for keys ``(n, d_mlp)`` (the rows of ``K``): ``(n, d_mlp)`` float64 rows ``a_i``,
    through ``C⁻¹K (λI + KᵀC⁻¹K)⁻¹`` (module docstring) so that ``ΔW = R Aᵀ``."""
    C_inv_K = cov.solve(keys).T  # (d_mlp, n) float64
    K = keys.to(C_inv_K.device, torch.float64).T  # (d_mlp, n)
    gram = K.T @ C_inv_K  # (n, n) KᵀC⁻¹K
    gram = (gram + gram.T) / 2
    system = gram + mom2_update_weight * torch.eye(len(gram), dtype=torch.float64, device=gram.device)  # (n, n)
    return torch.linalg.solve(system, C_inv_K.T)  # (n, d_mlp): rows of C⁻¹K(λI + G)⁻¹ (system is symmetric)


@dataclass(frozen=True, eq=False)
class LayerUpdate:
    """One layer's ``ΔW_l = R_l A_lᵀ``: ``residuals`` ``(n, d_model)`` (the rows of ``R_l``, each already divided
    by the number of remaining layers), ``key_selectors`` ``(n, d_mlp)`` (rows of ``A_l``), ``keys`` ``(n, d_mlp)``
    (``K_l``'s rows, prefix-averaged) and ``prefix_keys`` ``(n, n_prefixes, d_mlp)``, all float32."""

    layer: int
    residuals: torch.Tensor  # (n, d_model)
    key_selectors: torch.Tensor  # (n, d_mlp)
    keys: torch.Tensor  # (n, d_mlp)
    prefix_keys: torch.Tensor  # (n, n_prefixes, d_mlp)

    @property
    def delta_W(self) -> torch.Tensor:
        """``ΔW_l = R_l A_lᵀ``: ``(d_model, d_mlp)`` float32 (formed in float64)."""
        return (self.residuals.double().T @ self.key_selectors.double()).float()

    def coefficients(self, keys: torch.Tensor) -> torch.Tensor:
        """``c(k) = A_lᵀ k`` ``(..., n)``: ``ΔW_l k = Σ_i c_i(k) R_l[:, i]``."""
        return keys.float() @ self.key_selectors.to(keys.device).T

    def own(self) -> torch.Tensor:
        """``c_i(k_i)`` ``(n,)``: the coefficient of each request's residual at its own key."""
        return (self.keys * self.key_selectors).sum(-1)


def _add(model, update: LayerUpdate) -> None:
    W = W_out(model, update.layer)  # (d_model, d_mlp)
    W.add_(update.delta_W.to(W.device, W.dtype))


@dataclass(frozen=True, eq=False)
class RequestShare:
    """Request ``i``'s share of a layer update, seen as a single-key edit (what :class:`keyscope.editing.rep.REP` fits
    an adaptor to): ``k_star = k_i``, ``key_selector = a_i / (a_iᵀk_i)`` (so ``strength(k) = s_i(k)``, 1 at
    ``k_i``), the context ``prefixes`` and the request's keys behind them."""

    request: EditRequest
    layer: int
    k_star: torch.Tensor  # (d_mlp,)
    key_selector: torch.Tensor  # (d_mlp,)
    prefixes: tuple[str, ...]
    prefix_keys: torch.Tensor  # (n_prefixes, d_mlp)

    def strength(self, key: torch.Tensor) -> torch.Tensor:
        return key.float() @ self.key_selector.to(key.device)


class MEMITEdit(ModelEdit):
    """MEMIT's :class:`~keyscope.editing.base.ModelEdit`: the requests written jointly and one :class:`LayerUpdate`
    per layer. ``z`` ``(n, d_model)`` are the target residuals, ``traces`` their optimisation traces."""

    def __init__(self, requests: Sequence[EditRequest], updates: Sequence[LayerUpdate], z: torch.Tensor,
                 prefixes: Sequence[str], config: MEMITConfig, traces: Sequence[EditTrace] = ()):
        self.requests = tuple(requests)
        self.updates = tuple(updates)
        self.layers = tuple(u.layer for u in self.updates)
        self.z = z
        self.prefixes = tuple(prefixes)
        self.config = config
        self.traces = tuple(traces)

    def update(self, layer: int | None = None) -> LayerUpdate:
        return self.updates[self.layers.index(self._layer(layer))]

    @contextmanager
    def applied(self, model, tau: float | None = None, upto: int | None = None) -> Iterator:
        """Add each layer's ``ΔW_l`` (those of layers before ``upto`` only, if given) inside the block; every
        touched ``W_out`` is restored bit-exactly on exit (:func:`keyscope.editing.base.restoring`)."""
        updates = [u for u in self.updates if upto is None or u.layer < upto]
        with restoring(model, [u.layer for u in updates]):
            for update in updates:
                _add(model, update)
            yield model

    def strength(self, keys: torch.Tensor, layer: int | None = None, request: int = 0,
                 tau: float | None = None) -> torch.Tensor:
        """``s_i(k) = a_iᵀk / a_iᵀk_i`` at ``layer`` (module docstring; ROME's strength for one request)."""
        update = self.update(layer)
        return update.coefficients(keys)[..., request] / update.own()[request].to(keys.device)

    def value_direction(self, request: int = 0) -> torch.Tensor:
        """``Δv*_i = Σ_l c_{i,l}(k_{i,l}) R_l[:, i]`` ``(d_model,)``: request ``i``'s share of what the edit adds to
        the summed MLP outputs at its own keys (:mod:`keyscope.editing.base`, "Combined strength"; ``v* − W k*`` of
        ROME for one layer at λ = 0)."""
        return sum(self._shares(request)).float()  # (d_model,)

    def layer_weights(self, request: int = 0) -> dict[int, float]:
        """``w_l = c_{i,l}(k_{i,l}) R_l[:, i]ᵀ Δv* / ‖Δv*‖²`` per edited layer, summing to 1."""
        shares = self._shares(request)
        total = sum(shares)  # (d_model,) float64
        scale = float(total @ total)
        if scale == 0:
            raise KeyscopeError(f"request {request}'s edit writes nothing at its own keys (Δv* = 0)")
        return {u.layer: float(share @ total) / scale for u, share in zip(self.updates, shares)}

    def own_keys(self, request: int = 0) -> dict[int, torch.Tensor]:
        """``{l: k_{i,l}}``: request ``i``'s prefix-averaged key of each layer (``K_l``'s row, on the model edited
        at the layers before), where its ``s_{i,l}`` is 1."""
        return {u.layer: u.keys[request] for u in self.updates}

    def _shares(self, request: int) -> list[torch.Tensor]:
        """``c_{i,l}(k_{i,l}) R_l[:, i]`` ``(d_model,)`` float64 per layer."""
        return [u.own()[request].double() * u.residuals[request].double() for u in self.updates]

    def request_edit(self, request: int, layer: int | None = None) -> RequestShare:
        """Request ``request``'s share of ``layer``'s update as a single-key edit (:class:`RequestShare`)."""
        update = self.update(layer)
        own = update.own()[request]
        return RequestShare(self.requests[request], update.layer, update.keys[request],
                              update.key_selectors[request] / own, self.prefixes, update.prefix_keys[request])

    @property
    def prefix_keys(self) -> torch.Tensor:
        """The first request's keys behind each context prefix at the last layer."""
        return self.updates[-1].prefix_keys[0]


def compute_memit(model, requests: Sequence, config: MEMITConfig, covariances: dict, prefixes: Sequence[str],
                  base: DeltaConfig | None = None, batch_size: int = 32) -> MEMITEdit:
    """The MEMIT edit of ``requests`` (module docstring): ``covariances`` maps each of ``config.layers`` to its
    :class:`~keyscope.analysis.covariance.KeyCovariance` (of the unedited model, as MEMIT's cached statistics). The
    weights are unchanged on return (each layer is written while the next is computed, then restored)."""
    requests = [as_request(r) for r in requests]
    if not requests:
        raise KeyscopeError("an edit needs at least one request")
    layers = [check_layer(model, layer) for layer in config.layers]
    z_layer = layers[-1]
    prefixes = tuple(prefixes)
    zs, traces = zip(*(compute_z(model, r, z_layer, prefixes, config, base) for r in requests))
    Z = torch.stack(zs)  # (n, d_model)
    updates = []
    with restoring(model, layers):
        for i, layer in enumerate(layers):
            templates = [prefixed(prefix, r.template) for r in requests for prefix in prefixes]
            subjects = [r.subject for r in requests for _ in prefixes]
            prefix_keys = collect_keys(model, templates, subjects, layer, batch_size)  # (n · p, d_mlp)
            prefix_keys = prefix_keys.reshape(len(requests), len(prefixes), -1)  # (n, p, d_mlp) as prefixed_keys
            K = prefix_keys.mean(1)  # (n, d_mlp) compute_ks: keys averaged over the context templates
            H = subject_residuals(model, requests, z_layer, batch_size, _h_prefixes(prefixes, config))  # (n, d_model) cur_zs
            R = (Z.double() - H.double()) / (len(layers) - i)  # (n, d_model) the remaining layers' share
            A = memit_update(K, covariances[layer], config.mom2_update_weight)  # (n, d_mlp)
            device = W_out(model, layer).device
            update = LayerUpdate(layer, R.float().to(device), A.float().to(device), K, prefix_keys)
            _add(model, update)
            updates.append(update)
    return MEMITEdit(requests, updates, Z, prefixes, config, traces)


# ---------------------------------------------------------------------------------------------- editors


class MEMITEditor(Editor):
    """MEMIT (module docstring) over :attr:`MEMITConfig.layers` (``config`` or :meth:`MEMITConfig.for_model`),
    each layer's covariance from the run (:meth:`~keyscope.editing.base.EditContext.covariance`, loaded here while
    the model is unedited), ROME's context prefixes of the run."""

    name = "memit"
    batched = True
    config_name = "memit"
    config_class = MEMITConfig

    def __init__(self, model, context):
        super().__init__(model, context)
        self.config = context.config(self.config_name)
        self.covariances = {layer: context.covariance(check_layer(model, layer)) for layer in self.config.layers}

    @classmethod
    def prepare(cls, run, configs: dict, prepared: dict) -> None:
        """MEMIT's config (:meth:`MEMITConfig.for_model` unless given); it reads ROME's config and the run's
        context prefixes too (prepared for every run)."""
        if cls.config_name not in configs:
            configs[cls.config_name] = MEMITConfig.for_model(run.model)

    def compute(self, requests: Sequence, probes: Sequence | None = None) -> MEMITEdit:
        ctx = self.context
        return compute_memit(self.model, requests, self.config, self.covariances, ctx.prefixes, ctx.config("rome"),
                             ctx.batch_size)
