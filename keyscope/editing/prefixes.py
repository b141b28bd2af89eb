"""ROME's context prefixes: short texts sampled from the model and put before a prompt, over which a request's
key is averaged (``k* = mean_j k(x_j + prompt)``, Meng et al. 2022 eq. 3; kmeng01/rome ``rome/rome_main.py``
``get_context_templates``). Every method that averages keys over them (ROME, MEMIT, REP's anchors, evaluation's
near twins) reads the same prefixes of a run (:attr:`keyscope.editing.base.EditContext.prefixes`).

The sampler's settings are the fields ``context_template_length_params``, ``prefix_seeds``, ``prefix_start``,
``prefix_top_k``, ``seed`` and ``reference`` of a :class:`keyscope.editing.rome.ROMEConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from keyscope._infra.errors import KeyscopeError
from keyscope.analysis.keys import collect_keys
from keyscope.data.prompts import encode
from keyscope.editing.request import EditRequest
from keyscope.model.models import check_layer, hf_prepends_bos, logits_at, model_name

__all__ = ["PrefixSettings", "prefixed", "sample_context_prefixes", "context_prefixes", "prefixed_keys", "bos_convention", "PREFIX_SAMPLER"]


class PrefixSettings(Protocol):
    """The sampler's settings (the fields of a :class:`keyscope.editing.rome.ROMEConfig` of the same names):
    ``(length, count)`` groups, seed words, the start token, top-k, the generator's seed, and ``reference`` (the
    plain Hugging Face tokenizer's BOS convention)."""

    context_template_length_params: tuple
    prefix_seeds: tuple
    prefix_start: str | None
    prefix_top_k: int
    seed: int
    reference: bool


def _clean_prefix(text: str) -> str:
    """A generated prefix as ROME uses it: no braces (they would be template slots), one-line whitespace."""
    text = text.replace("{", " ").replace("}", " ").replace("\ufffd", " ")
    return " ".join(text.split())


def prefixed(prefix: str, template: str) -> str:
    """``"{prefix}. {template}"`` (ROME's context template), or the template itself for ``prefix == ""``."""
    return template if prefix == "" else f"{prefix}. {template}"


def _start_ids(tokenizer) -> list[int]:
    """The tokens every sequence starts with (the BOS); the BOS or else the EOS if the tokenizer adds nothing."""
    ids = list(encode(tokenizer, "").ids)
    if ids:
        return ids
    for token in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token is not None:
            return [int(token)]
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS token to start prefixes from")


#: Version of :func:`sample_context_prefixes`'s algorithm, part of the prefixes' cache key.
PREFIX_SAMPLER = 2


def _sample_rows(model, starts: list[list[int]], length: int, top_k: int, generator: torch.Generator) -> list[list[int]]:
    """Extend each row of ``starts`` (all of one length) to ``length`` tokens by top-``top_k`` sampling."""
    ids = torch.tensor(starts, dtype=torch.long)  # (n, pos)
    n_vocab = len(model.tokenizer)
    with torch.no_grad():
        while ids.shape[1] < length:
            last = torch.full((ids.shape[0],), ids.shape[1] - 1)  # (n,)
            logits = logits_at(model, ids.to(model.cfg.device), None, torch.arange(ids.shape[0]), last)
            logits = logits.float().cpu()  # (n, vocab)
            logits[:, n_vocab:] = float("-inf")
            top = logits.topk(min(top_k, n_vocab), dim=-1)  # (n, k)
            choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)  # (n, 1)
            ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)  # (n, pos + 1)
    return ids.tolist()


def _prefix_start(tokenizer, config: PrefixSettings) -> list[int]:
    """The tokens before every sampled prefix (dropped from it): ``config.prefix_start``'s id, else the
    tokenizer's own BOS (none where it adds none)."""
    if config.prefix_start is None:
        return list(encode(tokenizer, "").ids)
    token = tokenizer.convert_tokens_to_ids(config.prefix_start)
    if token is None or tokenizer.convert_ids_to_tokens(int(token)) != config.prefix_start:
        raise KeyscopeError(f"prefix_start {config.prefix_start!r} is not a token of the model's tokenizer")
    return [int(token)]


def sample_context_prefixes(model, config: PrefixSettings) -> list[list[int]]:
    """The token ids of ROME's context prefixes (BOS excluded), sampled from ``model``; see :func:`context_prefixes`.

    From the BOS alone (``config.prefix_seeds == ()``): all ``N = Σ count`` rows in one batch, sampled to the
    longest length, a row of a ``(length, count)`` group keeping its first ``length`` tokens (BOS included, as
    ROME's ``max_out_len``). From seed words: each seed's ``count // len(seeds)`` rows of each group, in EasyEdit's
    order (seed by seed), one batch per seed, to the longest length (the start token — the tokenizer's own BOS or
    ``config.prefix_start`` — and the seed's tokens counted, as ``generate_fast``'s ``max_out_len``). One ``torch.Generator`` seeded with ``config.seed`` draws
    every token, in that order."""
    groups = [(length, count) for length, count in config.context_template_length_params if count > 0]
    tokenizer = model.tokenizer
    generator = torch.Generator().manual_seed(config.seed)
    longest = max(length for length, _ in groups)
    head = _prefix_start(tokenizer, config)
    if not config.prefix_seeds:
        start = head or _start_ids(tokenizer)
        lengths = [length for length, count in groups for _ in range(count)]
        rows = _sample_rows(model, [start] * len(lengths), longest, config.prefix_top_k, generator)
        return [row[len(start) : max(length, len(start))] for row, length in zip(rows, lengths)]
    per_seed = {seed: [] for seed in config.prefix_seeds}  # seed → its rows' lengths, group by group
    for length, count in groups:
        for seed in config.prefix_seeds:
            per_seed[seed] += [length] * (count // len(config.prefix_seeds))
    sampled = {}
    for seed, lengths in per_seed.items():
        if lengths:
            start = head + list(encode(tokenizer, seed, prepend_bos=False).ids)
            rows = _sample_rows(model, [start] * len(lengths), max(longest, len(start)), config.prefix_top_k, generator)
            sampled[seed] = [row[len(head) : max(length, len(start))] for row, length in zip(rows, lengths)]
    # EasyEdit's order: group by group, and within a group seed by seed
    order, taken = [], dict.fromkeys(per_seed, 0)
    for _, count in groups:
        n = count // len(config.prefix_seeds)
        for seed in config.prefix_seeds:
            order += sampled.get(seed, [])[taken[seed] : taken[seed] + n]
            taken[seed] += n
    return order


def _prefixes_spec(model, config: PrefixSettings) -> dict:
    from keyscope.analysis.covariance import weights_fingerprint

    return {
        "sampler": PREFIX_SAMPLER,
        "model": model_name(model),
        "weights": weights_fingerprint(model),
        "dtype": str(next(model.original_model.parameters()).dtype),
        "vocab": len(model.tokenizer),
        "bos": list(encode(model.tokenizer, "").ids),
        "lengths": [list(group) for group in config.context_template_length_params],
        "top_k": config.prefix_top_k,
        "seeds": list(config.prefix_seeds),
        "start": config.prefix_start,
        "seed": config.seed,
    }


def context_prefixes(model, config: PrefixSettings, cache: bool = True) -> tuple[str, ...]:
    """ROME's context prefixes, sampled from ``model``: ``("", p_1, …, p_N)`` with ``""`` the bare prompt.

    Sampled with top-``prefix_top_k`` sampling from a ``torch.Generator`` seeded with ``config.seed``, from the
    BOS or from ``config.prefix_seeds`` (:func:`sample_context_prefixes`; logits beyond the tokenizer's
    vocabulary masked out), decoded without special tokens and cleaned (:func:`_clean_prefix`). Deterministic
    for a given model, config and device. With ``cache`` the sampled ids are kept in keyscope's cache, keyed by
    the model's weights and the sampler's settings (:mod:`keyscope._infra.cache`: atomic, verified), so every command
    and edit of a model reads the same prefixes without sampling them again.
    """
    from keyscope._infra import cache as artefacts

    if not any(count > 0 for _, count in config.context_template_length_params):
        return ("",)

    def compute() -> dict[str, torch.Tensor]:
        rows = sample_context_prefixes(model, config)
        width = max((len(row) for row in rows), default=0)
        ids = torch.zeros((len(rows), width), dtype=torch.long)  # (n_prefixes, width)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        return {"ids": ids, "lengths": torch.tensor([len(row) for row in rows], dtype=torch.long)}

    tensors = artefacts.cached("prefixes", _prefixes_spec(model, config), compute) if cache else compute()
    rows = [ids[:length].tolist() for ids, length in zip(tensors["ids"], tensors["lengths"].tolist())]
    texts = model.tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return ("", *(_clean_prefix(text) for text in texts))


def bos_convention(model, config: PrefixSettings) -> bool | None:
    """The BOS convention of the edit's tokenisation: the bridge's own (``None``), or in reference mode the
    plain Hugging Face tokenizer's (:func:`keyscope.model.models.hf_prepends_bos`)."""
    return hf_prepends_bos(model) if config.reference else None


def prefixed_keys(
    model, request: EditRequest, layer: int, prefixes: Sequence[str], prepend_bos: bool | None = None
) -> torch.Tensor:
    """The layer-``layer`` keys ``k(x_j + prompt)`` at the subject's last token behind each prefix (``""`` =
    the bare prompt, first): ``(n_prefixes, d_mlp)`` float32.

    The key at the subject's last token depends only on the tokens up to it, so the rest of the prompt
    does not matter; the forward passes stop at the key (:func:`keyscope.analysis.keys.collect_keys`, whose
    ``prepend_bos`` convention applies).
    """
    layer = check_layer(model, layer)
    templates = [prefixed(prefix, request.template) for prefix in prefixes]
    subjects = [request.subject] * len(templates)
    return collect_keys(model, templates, subjects, layer, prepend_bos=prepend_bos)  # (n_prefixes, d_mlp)
