"""Replaying blocks: the architecture facts behind running a model from a layer on, with the positions before an
injection cached.

An optimisation that adds ``δ`` at one layer (ROME's v*, MEMIT's z) changes nothing below it, nor at any position
before the injection (attention is causal). Two facts about the Hugging Face families decide whether that can be
exploited: whether a block's output is the residual stream plus its MLP output (:data:`ADDITIVE_BLOCK_FAMILIES`: then
``δ`` added after the block equals ``δ`` added to the MLP output, and the blocks below can be replayed from one
recorded output, :func:`blocks_replayed`), and whether a decoder layer reads earlier positions only through its
cache (:data:`PREFIX_CACHE_FAMILIES`: then the positions before the injection run once, :class:`PrefixCached`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from keyscope.model.capture import module_output

__all__ = ["ADDITIVE_BLOCK_FAMILIES", "PREFIX_CACHE_FAMILIES", "block_output", "blocks_replayed", "PrefixCached"]


#: HF model types whose block output is the residual stream plus the attention and MLP outputs (pre-norm or
#: parallel-residual blocks), so that δ added to the block's output equals δ added to its MLP output: the
#: families :func:`~keyscope.editing.rome.compute_v_star` replays the lower layers for.
ADDITIVE_BLOCK_FAMILIES = frozenset({"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"})


def block_output(model, layer: int):
    """A capture of block ``layer``'s output (:func:`keyscope.model.capture.module_output`: as the HF layer loop passes it
    on, a tensor or a tuple whose first item is the residual stream), its residual stream detached: the object
    :func:`blocks_replayed` returns verbatim. A hook point would give the tensor alone, not the tuple."""

    def detached(output):
        first = output if isinstance(output, torch.Tensor) else output[0]
        return first.detach() if isinstance(output, torch.Tensor) else (first.detach(), *output[1:])

    return module_output(model.blocks[layer], detached)


@contextmanager
def blocks_replayed(model, layer: int, output, shift) -> Iterator[dict]:
    """Blocks ``0..layer`` skip their computation: each returns ``output`` (block ``layer``'s recorded output),
    block ``layer`` with ``shift`` applied to its residual stream. Restored on exit.

    The forward functions are instance attributes shadowing the blocks' own (the bridge's blocks are the modules
    the HF layer loop calls); the yielded dict counts the replays, so a loop that bypassed them is detected.
    """
    calls = {"replays": 0}
    blocks = [model.blocks[i] for i in range(layer + 1)]

    def replay(*args, shifted: bool, **kwargs):
        calls["replays"] += 1
        if not shifted:
            return output
        if isinstance(output, torch.Tensor):
            return shift(output)
        return (shift(output[0]), *output[1:])

    try:
        for i, block in enumerate(blocks):
            vars(block)["forward"] = functools.partial(replay, shifted=i == layer)
        yield calls
    finally:
        for block in blocks:
            vars(block).pop("forward", None)


#: HF model types whose decoder layers (called through the bridge's blocks, attention delegated to HF by
#: :func:`keyscope.model.models.sdpa_attention`) read earlier positions' keys and values only through ``cache.update(k, v,
#: layer_idx)``, take a 4-D additive ``attention_mask`` and, for rotary models, the ``position_embeddings`` of the
#: base model's ``rotary_emb`` (GPT-2's absolute positions are in the recorded residual already): the families whose
#: v* loop runs only the positions δ can change (:class:`PrefixCached`), unless a batch is longer than the model's
#: sliding attention window (which the cached path's mask does not apply).
PREFIX_CACHE_FAMILIES = frozenset({"gpt2", "llama", "mistral", "qwen2"})


class PrefixKV:
    """The one method of a Hugging Face ``Cache`` these families' attention calls, ``update(k, v, layer_idx)``.

    While ``recording`` it keeps each layer's keys and values ``(batch, kv_heads, P, head_dim)`` (detached) and
    returns them; afterwards it returns ``cat(prefix, new)`` along the positions and stores nothing, so the cache
    never grows over the steps and no step's graph reaches into another's."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.keys[layer_idx], self.values[layer_idx] = keys.detach(), values.detach()
            return keys, values
        if layer_idx not in self.keys:  # no prefix at all (P = 0)
            return keys, values
        return (torch.cat([self.keys[layer_idx], keys], -2),  # (batch, kv_heads, P + S, head_dim)
                torch.cat([self.values[layer_idx], values], -2))


class PrefixCached:
    """The logits of the v* objective from the positions δ can change, with the others' keys and values cached.

    δ is added to the residual after block ``L`` at each row's subject last token ``s_r``. Attention is causal, so
    every position ``< s_r`` of row ``r`` is the same at every layer whatever δ is: its keys and values in blocks
    ``L+1..N-1`` are computed once per edit, and each step runs those blocks on the positions ``≥ s_r`` only.

    Layout. Row ``r`` (length ``n_r``) is re-aligned so that its subject's last token sits at column ``P = max_r s_r``:
    column ``c`` holds original position ``c − P + s_r``; the **prefix** ``c < P`` is left-padded, the **suffix**
    ``P ≤ c < P + S`` (``S = max_r (n_r − s_r)``) right-padded. Column ``c`` may attend to column ``c'`` iff
    ``c' ≤ c`` and ``c'`` holds a real token (or ``c' = c``, which keeps a pad's own output finite: a NaN value
    would turn a zero attention weight into NaN), as an additive ``(batch, 1, q, kv)`` mask. Position ids are the
    original ones, so rotary embeddings see exactly the angles of the right-padded batch.

    Once: blocks ``0..L`` on the whole batch (``stop_at_layer``, no gradient) for block ``L``'s output at δ = 0, then
    blocks ``L+1..N-1`` on its prefix columns, ``cache`` recording their keys and values. Each step
    (:meth:`__call__`): the suffix columns of that output plus δ at column ``P``, through blocks ``L+1..N-1`` with
    the cache returning ``[prefix k/v ; suffix k/v]``, then the final norm and the unembedding at the target
    columns only (:func:`keyscope.model.models.logits_at` semantics): ``O(S·(P + S))`` attention and ``O(S)`` MLP work
    per block instead of ``O(T²)`` and ``O(T)`` for the padded length ``T``. Attention runs in
    Hugging Face's own modules (:func:`keyscope.model.models.sdpa_attention`, active around every call): the bridge's
    re-implemented attention reads a cache under ``past_key_values``, a name transformers 5 layers no longer pass.
    """

    def __init__(self, model, layer: int, batch, rows: torch.Tensor, positions: torch.Tensor):
        self.model, self.layer = model, layer
        with block_output(model, layer) as recorded, torch.no_grad():
            model(batch.input_ids, attention_mask=batch.attention_mask, stop_at_layer=layer + 1, return_type=None)
        output = recorded["output"]
        output = output if isinstance(output, torch.Tensor) else output[0]  # (batch, pos, d_model)
        device = output.device
        subject = batch.inject[..., 0].argmax(1)  # (batch,) s_r
        lengths = batch.attention_mask.sum(1)  # (batch,) n_r
        P, S = int(subject.max()), int((lengths - subject).max())
        columns = torch.arange(P + S, device=device)  # (P + S,)
        original = columns[None] - P + subject[:, None]  # (batch, P + S) original position of each column
        real = (original >= 0) & (original < lengths[:, None])  # (batch, P + S)
        aligned = output.gather(1, original.clamp(0, output.shape[1] - 1)[..., None].expand(-1, -1, output.shape[-1]))
        # aligned: (batch, P + S, d_model), block L's output at δ = 0
        allowed = (columns[:, None] >= columns[None, :]) & real[:, None, :] | torch.eye(P + S, dtype=torch.bool,
                                                                                         device=device)
        # allowed: (batch, q = P + S, kv = P + S)
        mask = torch.zeros(allowed.shape, dtype=output.dtype, device=device).masked_fill(
            ~allowed, torch.finfo(output.dtype).min)[:, None]  # (batch, 1, P + S, P + S) additive
        position_ids = original.clamp(min=0)  # (batch, P + S)
        rotary = getattr(model.original_model.base_model, "rotary_emb", None)
        with torch.no_grad():
            cos_sin = None if rotary is None else rotary(aligned, position_ids)  # 2 × (batch, P + S, head_dim)
        self.cache = PrefixKV()
        if P:
            with torch.no_grad():
                self._upper_blocks(aligned[:, :P], mask[..., :P, :P], self._positions(position_ids, cos_sin, slice(P)))
        self.cache.recording = False
        self.suffix = aligned[:, P:]  # (batch, S, d_model)
        self.mask = mask[..., P:, :]  # (batch, 1, S, P + S)
        self.positions = self._positions(position_ids, cos_sin, slice(P, None))
        self.rows, self.columns = rows, positions - subject[rows]  # (n,), (n,) suffix column of each logit

    @staticmethod
    def _positions(position_ids: torch.Tensor, cos_sin, columns: slice) -> dict:
        """The positional keyword arguments of a decoder layer for ``columns``: ``position_ids`` ``(batch, q)`` and,
        for rotary models, ``position_embeddings`` (cos, sin) ``(batch, q, head_dim)`` each."""
        extra = {} if cos_sin is None else {"position_embeddings": tuple(t[:, columns] for t in cos_sin)}
        return {"position_ids": position_ids[:, columns], **extra}

    def _upper_blocks(self, residual: torch.Tensor, mask: torch.Tensor, positions: dict) -> torch.Tensor:
        """Blocks ``layer+1..N-1`` on ``residual`` ``(batch, q, d_model)``, attending to the cache and themselves."""
        for block in self.model.blocks[self.layer + 1:]:
            out = block(residual, attention_mask=mask, cache=self.cache, **positions)
            residual = out if isinstance(out, torch.Tensor) else out[0]  # (batch, q, d_model)
        return residual

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, vocab)`` at the target rows and positions with ``δ`` ``(d_model,)`` at column ``P``."""
        shifted = torch.cat([self.suffix[:, :1] + delta.to(self.suffix.dtype), self.suffix[:, 1:]], 1)
        # shifted: (batch, S, d_model)
        final = self._upper_blocks(shifted, self.mask, self.positions)  # (batch, S, d_model)
        return self.model.unembed(self.model.ln_final(final[self.rows, self.columns]))  # (n, vocab)
