"""Keys: the input of an MLP's down-projection at a subject's last token.

For a fact written as a prompt template (``"{} is located in the city of"``) and a subject
(``"The Eiffel Tower"``), the **key** of layer ``L`` is the activation entering ``W_out`` of that layer
(TransformerLens hook ``blocks.{L}.mlp.hook_post``, see :func:`keyscope.model.models.key_hook`) at the subject's
last token — the vector ROME (Meng et al. 2022) writes its rank-one edit against, and the object whose
robustness to rephrasing, token shuffles and long contexts Yan et al. ("Keys to Robust Edits") study.

The token conventions (BOS, the subject's last token, padding) are those of :mod:`keyscope.data.prompts`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from keyscope.data.prompts import encode, fill, length_batches, locate, pad_batch, tokens_overlapping
from keyscope.model.capture import run_to
from keyscope.model.models import check_layer, key_hook


def layer_keys(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int) -> torch.Tensor:
    """All positions' layer-``layer`` keys of a batch: ``(batch, pos, d_mlp)`` in the model's dtype.

    One forward pass stopped at the key (:func:`keyscope.model.capture.run_to`): the bridge skips every later block
    (``stop_at_layer=layer + 1``) and the capture ends the pass as soon as the key is computed, so the rest of block
    ``layer`` (the down-projection) and — for the last layer — the final norm and unembedding are skipped too.
    Runs under ``torch.no_grad()``; padded positions hold meaningless keys that callers must mask out. This is the
    streaming primitive of :mod:`keyscope.analysis.covariance` and corpus scans.
    """
    check_layer(model, layer)
    device = model.cfg.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    with torch.no_grad():
        return run_to(model, input_ids, [key_hook(layer)], attention_mask)[key_hook(layer)]  # (batch, pos, d_mlp)


def collect_context_keys(
    model,
    prompts: Sequence[str],
    subjects: Sequence[str],
    layer: int,
    max_per_prompt: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> torch.Tensor:
    """Layer-``layer`` keys at the positions of each prompt **outside** its subject (template words, long
    contexts; BOS and other special tokens excluded): float32 ``(n_keys, d_mlp)``.

    These are keys an edit of the subject should leave alone. With ``max_per_prompt`` at most that many
    positions per prompt are kept, drawn with ``seed`` (a 300-token context otherwise dominates).
    """
    if len(prompts) != len(subjects):
        raise ValueError(f"got {len(prompts)} prompts but {len(subjects)} subjects")
    check_layer(model, layer)
    tokenizer = model.tokenizer
    rng = torch.Generator().manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chosen: list[tuple[list[int], list[int]]] = []  # (ids, positions) per prompt
    for prompt, subject in zip(prompts, subjects):
        span = fill(prompt, subject)
        encoded = encode(tokenizer, span.text)
        inside = set(tokens_overlapping(encoded, span.start, span.end))
        positions = [i for i, sp in enumerate(encoded.special) if not sp and i not in inside]
        if max_per_prompt is not None and len(positions) > max_per_prompt:
            pick = torch.randperm(len(positions), generator=rng)[:max_per_prompt].sort().values
            positions = [positions[i] for i in pick.tolist()]
        chosen.append((list(encoded.ids), positions))
    out: list[torch.Tensor] = []
    for rows in length_batches([len(ids) for ids, _ in chosen], batch_size):
        input_ids, attention_mask = pad_batch([chosen[i][0] for i in rows], pad_id, device=model.cfg.device)
        batch_keys = layer_keys(model, input_ids, attention_mask, layer)  # (batch, pos, d_mlp)
        for row, i in enumerate(rows):
            if chosen[i][1]:
                out.append(batch_keys[row, chosen[i][1]].float())  # (n_positions, d_mlp)
    if not out:
        return torch.zeros((0, int(model.cfg.d_mlp)), device=model.cfg.device)
    return torch.cat(out)  # (n_keys, d_mlp)


def collect_keys(
    model,
    prompts: Sequence[str],
    subjects: Sequence[str],
    layer: int,
    batch_size: int = 32,
    padding_side: str = "right",
    prepend_bos: bool | None = None,
) -> torch.Tensor:
    """Layer-``layer`` keys at each subject's last token: a float32 ``(n, d_mlp)`` tensor on the model's device.

    ``prompts[i]`` is a template with ``{}`` or a filled prompt holding ``subjects[i]`` (see :func:`fill`).
    Each prompt is tokenised once (:func:`locate`); prompts are sorted by length, run in batches of
    ``batch_size`` with an explicit attention mask (``padding_side`` ``"right"``, the default, or
    ``"left"``; both give the same keys, see the module notes) and the forward pass stops at the key
    (:func:`layer_keys`). Row ``i`` of the result belongs to ``prompts[i]`` whatever the batching.
    """
    if len(prompts) != len(subjects):
        raise ValueError(f"got {len(prompts)} prompts but {len(subjects)} subjects")
    check_layer(model, layer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    tokenizer = model.tokenizer
    located = [locate(tokenizer, p, s, prepend_bos=prepend_bos) for p, s in zip(prompts, subjects)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    d = int(model.cfg.d_mlp)
    keys = torch.empty((len(located), d), dtype=torch.float32, device=model.cfg.device)  # (n, d_mlp)
    for rows in length_batches([len(enc) for enc, _ in located], batch_size):
        seqs = [located[i][0].ids for i in rows]
        input_ids, attention_mask = pad_batch(seqs, pad_id, padding_side, device=model.cfg.device)
        width = input_ids.shape[1]
        positions = [
            located[i][1] + (0 if padding_side == "right" else width - len(located[i][0])) for i in rows
        ]
        batch_keys = layer_keys(model, input_ids, attention_mask, layer)  # (batch, pos, d_mlp)
        picked = batch_keys[torch.arange(len(rows)), torch.as_tensor(positions)]  # (batch, d_mlp)
        keys[torch.as_tensor(rows, device=keys.device)] = picked.float()
    return keys
