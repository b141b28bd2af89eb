"""The optimisation ROME's v* and MEMIT's z share: find ``δ`` that, added at one activation at the subject's last
token of every prompt, makes the model predict the new target (Meng et al. 2022, eq. 4; kmeng01/rome
``rome/compute_v.py``, kmeng01/memit ``memit/compute_z.py``), with the KL "essence" term, ROME's weight decay and
the norm clamp.

:func:`v_star_batch` builds the padded, teacher-forced batch of a request; :func:`optimise_delta` runs the loop,
recomputing only what ``δ`` can change (:mod:`keyscope.model.replay`). The settings are the fields
``v_num_grad_steps``, ``v_lr``, ``v_weight_decay``, ``clamp_norm_factor``, ``kl_factor``, ``kl_prompt``,
``early_stop_loss``, ``early_stop_probability`` and ``reference`` of a :class:`keyscope.editing.rome.ROMEConfig`
(MEMIT's :meth:`~keyscope.editing.memit.MEMITConfig.z_config` gives one).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from keyscope.data.prompts import SLOT, encode, fill, pad_batch, tokens_overlapping
from keyscope.editing.prefixes import bos_convention, prefixed
from keyscope.editing.request import EditRequest, EmptyTarget, TargetTokenization
from keyscope.model.models import d_model, family, fast_logits_ok, frozen, logits_at, sdpa_attention
from keyscope.model.replay import PREFIX_CACHE_FAMILIES, PrefixCached, block_output, blocks_replayed

__all__ = ["DeltaConfig", "check_delta_settings", "EditTrace", "VStarBatch", "teacher_forced", "v_star_batch", "optimise_delta"]


@dataclass(frozen=True)
class DeltaConfig:
    """The settings of the δ optimisation (what MEMIT's z step runs with, :meth:`keyscope.editing.memit.MEMITConfig.z_config`).
    A :class:`keyscope.editing.rome.ROMEConfig` has the same fields and serves wherever a ``DeltaConfig`` is read.
    No I/O."""

    v_num_grad_steps: int
    v_lr: float
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    kl_prompt: str
    early_stop_loss: float | None = None
    early_stop_probability: float | None = None
    reference: bool = False

    def __post_init__(self):
        check_delta_settings(self)


def check_delta_settings(config) -> None:
    """Raise ``ValueError`` for settings the δ loop cannot run with (a :class:`DeltaConfig` or a ROMEConfig):
    no step, a non-positive clamp or learning rate, an essence prompt without the subject's slot."""
    if config.v_num_grad_steps < 1:
        raise ValueError(f"v_num_grad_steps must be at least 1, not {config.v_num_grad_steps}")
    if config.clamp_norm_factor <= 0 or config.v_lr <= 0:
        raise ValueError("clamp_norm_factor and v_lr must be positive")
    if SLOT not in config.kl_prompt:
        raise ValueError(f"kl_prompt must contain {SLOT!r} for the subject, not {config.kl_prompt!r}")


@dataclass(frozen=True)
class EditTrace:
    """What the v* optimisation did and how long each stage took.

    Per evaluated step (one forward pass each): the total ``loss``, its terms ``nll`` (mean over prompts of
    the mean target-token NLL), ``kl`` (unweighted KL) and ``weight_decay`` (weighted), and
    ``target_probability`` (mean over prompts of the geometric-mean target-token probability, ROME's
    "avg prob"). The last entry belongs to the returned δ.
    """

    loss: tuple[float, ...]
    nll: tuple[float, ...]
    kl: tuple[float, ...]
    weight_decay: tuple[float, ...]
    target_probability: tuple[float, ...]
    delta_norm: float  # final ‖δ‖ = ‖v* − W k*‖
    max_delta_norm: float  # the clamp radius clamp_norm_factor · ‖W k* + b‖
    value_norm: float  # ‖W k* + b‖
    stopped_early: bool
    seconds_prefixes: float = 0.0
    seconds_k_star: float = 0.0
    seconds_v_star: float = 0.0
    seconds_update: float = 0.0

    @property
    def n_steps(self) -> int:
        return len(self.loss)

    @property
    def seconds(self) -> float:
        return self.seconds_prefixes + self.seconds_k_star + self.seconds_v_star + self.seconds_update


@dataclass(frozen=True)
class VStarBatch:
    """The padded batch of the v* objective: the prefixed, teacher-forced prompts, then the KL prompt."""

    input_ids: torch.Tensor  # (batch, pos)
    attention_mask: torch.Tensor  # (batch, pos)
    inject: torch.Tensor  # (batch, pos, 1): 1 at each row's subject last token, where δ is added
    target_rows: torch.Tensor  # (n_targets,) the prompt of each target token
    target_positions: torch.Tensor  # (n_targets,) the position whose logits predict it
    target_ids: torch.Tensor  # (n_targets,)
    n_prompts: int
    kl_position: int  # where the KL prompt (row n_prompts) is read: its last token, or (reference) the subject's


def teacher_forced(
    tokenizer, template: str, subject: str, target: str, prepend_bos: bool | None = None
) -> tuple[list[int], int, list[int], list[int]]:
    """Tokenise ``template`` filled with ``subject`` and followed by ``target`` in one pass.

    A space separates them unless the prompt ends or the target starts with whitespace (ROME prepends a
    space to the target). Returns the ids to feed (up to but excluding the last target token), the
    subject's last token index, the target token ids and the positions whose logits predict them.
    """
    span = fill(template, subject)
    prompt = span.text
    separator = "" if prompt[-1:].isspace() or target[:1].isspace() else " "
    text = prompt + separator + target
    encoded = encode(tokenizer, text, prepend_bos=prepend_bos)
    subject_index = tokens_overlapping(encoded, span.start, span.end)[-1]
    target_indices = tokens_overlapping(encoded, len(prompt) + len(separator), len(text))
    if not target_indices:
        raise EmptyTarget(f"target {target!r} has no token in the tokenisation of {text!r}")
    first = target_indices[0]
    if encoded.offsets[first][0] < len(prompt.rstrip()) or target_indices != list(range(first, target_indices[-1] + 1)):
        raise TargetTokenization(
            f"the target {target!r} does not start on a token boundary after {prompt!r}; "
            f"start it with a space or end the prompt with one"
        )
    if first <= subject_index:
        raise TargetTokenization(f"the target {target!r} overlaps the subject {subject!r} in {text!r}")
    target_ids = [encoded.ids[i] for i in target_indices]
    return list(encoded.ids[: target_indices[-1]]), subject_index, target_ids, [i - 1 for i in target_indices]


def v_star_batch(model, request: EditRequest, prefixes: Sequence[str], config: DeltaConfig) -> VStarBatch:
    tokenizer = model.tokenizer
    prepend_bos = bos_convention(model, config)
    sequences, subject_indices = [], []
    rows, positions, targets = [], [], []
    for row, prefix in enumerate(prefixes):
        ids, subject_index, target_ids, target_positions = teacher_forced(
            tokenizer, prefixed(prefix, request.template), request.subject, request.target_new, prepend_bos
        )
        sequences.append(ids)
        subject_indices.append(subject_index)
        rows += [row] * len(target_ids)
        positions += target_positions
        targets += target_ids
    kl_span = fill(config.kl_prompt, request.subject)
    kl_encoded = encode(tokenizer, kl_span.text, prepend_bos=prepend_bos)
    kl_last = max(i for i, special in enumerate(kl_encoded.special) if not special)
    kl_subject = tokens_overlapping(kl_encoded, kl_span.start, kl_span.end)[-1]
    kl_position = kl_subject if config.reference else kl_last  # rome/compute_v.py: lookup_idxs of the KL prompt
    sequences.append(list(kl_encoded.ids[: kl_last + 1]))
    subject_indices.append(kl_subject)

    device = model.cfg.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention_mask = pad_batch(sequences, pad_id, "right", device=device)  # (batch, pos)
    inject = torch.zeros((*input_ids.shape, 1), dtype=torch.float32, device=device)  # (batch, pos, 1)
    inject[torch.arange(len(sequences)), torch.as_tensor(subject_indices), 0] = 1.0
    as_long = dict(dtype=torch.long, device=device)
    return VStarBatch(
        input_ids, attention_mask, inject, torch.tensor(rows, **as_long), torch.tensor(positions, **as_long),
        torch.tensor(targets, **as_long), len(prefixes), kl_position,
    )


def optimise_delta(model, batch: VStarBatch, hook: str, value_norm: float, config: DeltaConfig, *,
                   replay_layer: int | None = None, progress: bool = False, reuse_lower_layers: bool = True,
                   reuse_prefix: bool = True, sdpa: bool | None = None,
                   label: str = "δ") -> tuple[torch.Tensor, EditTrace]:
    """The δ ``(d_model,)`` of ROME's v* objective (:func:`~keyscope.editing.rome.compute_v_star`), added at activation ``hook`` at the
    subject's last token of every row of ``batch`` (:func:`v_star_batch`), with the weight decay
    ``v_weight_decay · ‖δ‖ / value_norm²`` and the clamp ``‖δ‖ ≤ clamp_norm_factor · value_norm``. ROME adds δ
    at the MLP output (:func:`~keyscope.model.models.value_hook`, ``value_norm = ‖W k* + b‖``); MEMIT's ``compute_z``
    at the residual stream after a block (:mod:`keyscope.editing.memit`, ``value_norm`` the residual's norm).

    ``replay_layer``: a block whose output plus ``inject · δ`` equals the forward pass with δ added at ``hook``
    (``None``: none); with ``reuse_lower_layers`` every evaluation after the first replays that block's recorded
    output instead of running blocks ``0..replay_layer`` (:func:`~keyscope.editing.rome.compute_v_star`, "Speed"), and with ``reuse_prefix``
    too (families of :data:`~keyscope.model.replay.PREFIX_CACHE_FAMILIES`) blocks ``replay_layer+1..`` run on each row's positions from
    its injection on only, the earlier ones' keys and values cached (:class:`~keyscope.model.replay.PrefixCached`). ``sdpa`` (default:
    on CUDA devices) runs attention through the fused kernel; ``progress`` shows a bar over the steps, named
    ``label``."""
    start = time.perf_counter()
    device = model.cfg.device
    max_norm = config.clamp_norm_factor * value_norm

    delta = torch.zeros(d_model(model), dtype=torch.float32, device=device, requires_grad=True)  # (d_model,)
    optimizer = torch.optim.Adam([delta], lr=config.v_lr)
    counts = torch.bincount(batch.target_rows, minlength=batch.n_prompts).float()  # (n_prompts,)
    kl_row = torch.tensor([batch.n_prompts], device=device)
    rows = torch.cat([batch.target_rows, kl_row])  # (n_targets + 1,): the target tokens, then the KL prompt
    positions = torch.cat([batch.target_positions, kl_row.new_tensor([batch.kl_position])])  # (n_targets + 1,)
    fast_logits_ok(model)  # decide the logits path before the δ hook is installed

    def add_delta(activation: torch.Tensor, hook) -> torch.Tensor:
        return activation + (batch.inject * delta).to(activation.dtype)  # (batch, pos, d_model)

    reference = None  # (vocab,) log P₀ at the KL position
    history: dict[str, list[float]] = {k: [] for k in ("loss", "nll", "kl", "weight_decay", "target_probability")}
    stopped_early = False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.v_num_grad_steps, desc=label, unit="step", leave=False)
    recorded: dict = {}
    reuse = reuse_lower_layers and replay_layer is not None
    window = getattr(model.original_model.config, "sliding_window", None)  # the cache's mask has no sliding window
    cached = (reuse and reuse_prefix and family(model) in PREFIX_CACHE_FAMILIES and fast_logits_ok(model)
              and not (window and batch.input_ids.shape[1] > window))
    prefix_cached: list[PrefixCached] = []  # built at the first evaluation

    def shift(residual: torch.Tensor) -> torch.Tensor:
        return residual + (batch.inject * delta).to(residual.dtype)  # (batch, pos, d_model)

    def logits_at_delta() -> torch.Tensor:
        """Logits ``(n_targets + 1, vocab)`` with the current δ: the suffix pass over the cached prefix, a full pass
        (hooked δ) or the replay above."""
        if cached:
            if not prefix_cached:
                prefix_cached.append(PrefixCached(model, replay_layer, batch, rows, positions))
            return prefix_cached[0](delta)
        if reuse and "output" in recorded:
            with blocks_replayed(model, replay_layer, recorded["output"], shift) as calls:
                logits = logits_at(model, batch.input_ids, batch.attention_mask, rows, positions)
            if calls["replays"] != replay_layer + 1:
                raise RuntimeError(f"the forward pass bypassed the replayed blocks 0..{replay_layer} "
                                   f"({calls['replays']} calls)")
            return logits
        with (block_output(model, replay_layer) if reuse else contextlib.nullcontext({})) as kept, \
                model.hooks(fwd_hooks=[(hook, add_delta)]):
            logits = logits_at(model, batch.input_ids, batch.attention_mask, rows, positions)
        recorded.update(kept)
        return logits

    if sdpa is None:
        sdpa = torch.device(device).type == "cuda"
    attention = sdpa_attention(model) if sdpa or cached else contextlib.nullcontext()
    try:
        with frozen(model), torch.enable_grad(), attention as hf_attention:
            cached = cached and bool(hf_attention)  # the cache needs Hugging Face's attention modules
            for step in range(config.v_num_grad_steps):
                optimizer.zero_grad()
                logits = logits_at_delta().float()  # (n_targets + 1, vocab)
                log_probs = logits[:-1].log_softmax(-1).gather(1, batch.target_ids[:, None])[:, 0]  # (n_targets,)
                per_prompt = torch.zeros(batch.n_prompts, device=device).index_add(0, batch.target_rows, log_probs) / counts
                nll = -per_prompt.mean()
                kl_log_probs = logits[-1].log_softmax(-1)  # (vocab,)
                if reference is None:
                    reference = kl_log_probs.detach()
                kl = (kl_log_probs.exp() * (kl_log_probs - reference)).sum()  # KL(P_δ ‖ P₀)
                weight_decay = config.v_weight_decay * delta.norm() / value_norm**2
                loss = nll + config.kl_factor * kl + weight_decay
                probability = float(per_prompt.detach().exp().mean())
                for name, term in (("loss", loss), ("nll", nll), ("kl", kl), ("weight_decay", weight_decay)):
                    history[name].append(float(term.detach()))
                history["target_probability"].append(probability)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", p=f"{probability:.3f}", refresh=False)
                if (config.early_stop_loss is not None and float(loss.detach()) < config.early_stop_loss) or (
                    config.early_stop_probability is not None and probability >= config.early_stop_probability
                ):
                    stopped_early = True
                    break
                if step == config.v_num_grad_steps - 1:
                    break
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    norm = delta.norm()
                    if norm > max_norm:
                        delta.mul_(max_norm / norm)
    finally:
        if bar is not None:
            bar.close()
    delta = delta.detach()
    trace = EditTrace(
        loss=tuple(history["loss"]),
        nll=tuple(history["nll"]),
        kl=tuple(history["kl"]),
        weight_decay=tuple(history["weight_decay"]),
        target_probability=tuple(history["target_probability"]),
        delta_norm=float(delta.norm()),
        max_delta_norm=max_norm,
        value_norm=value_norm,
        stopped_early=stopped_early,
        seconds_v_star=time.perf_counter() - start,
    )
    return delta, trace
