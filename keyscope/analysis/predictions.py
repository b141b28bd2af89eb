"""Next-token predictions at the end of prompts: the model's top-k tokens and the probability of a target.

An edit is judged by what the model predicts right after a prompt (ROME's efficacy, paraphrase and
neighbourhood scores; Yan et al.'s rephrased, shuffled and long-context probes). Everything here reads the
next-token distribution ``P(· | prompt) = softmax(logits[last real token])`` of prompts given as **context
token ids** — the exact sequences fed to the model — run in right-padded batches with an attention mask
(exact for a causal model: real tokens never attend to the pads after them; see :mod:`keyscope.analysis.keys`).

* :func:`prompt_context` tokenises a prompt as the model sees it (BOS included where the tokenizer adds
  one; special tokens after the last word, such as an appended EOS, removed);
* :func:`target_context` tokenises ``prompt + " " + target`` once and returns the ids before the target's
  first token and that token, so the prediction is read where the model sees the target begin;
* :func:`next_token_top_k` runs the batches and returns the top-k tokens with their probabilities, and
  optionally the probability of one chosen token per prompt;
* :func:`score_targets` scores whole (multi-token) targets teacher-forced: their log-probability, whether
  every target token is the top-1 prediction, and the argmax tokens at the target positions;
* :func:`predicts_target`, :func:`known_mask`, :func:`known_facts` and :func:`sample_known_facts` ask which facts
  (of :mod:`keyscope.data.datasets`) the model knows: top-1 on the first token of the true target.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from keyscope._infra.errors import KeyscopeError, SubjectNotFound
from keyscope.data.prompts import encode, length_batches, pad_batch, tokens_overlapping

__all__ = ["TopK", "prompt_context", "target_context", "target_sequence", "TargetScores", "score_targets", "target_runs",
           "next_token_top_k", "decode_token", "predicts_target", "has_true_target", "known_mask", "known_facts",
           "sample_known_facts", "UnknownFacts"]


@dataclass(frozen=True)
class TopK:
    """Next-token predictions of ``n`` prompts: ``ids`` and ``probabilities`` ``(n, k)`` (best first) and,
    when target tokens were given, ``target_probabilities`` ``(n,)``. CPU tensors, float32 probabilities."""

    ids: torch.Tensor  # (n, k) long
    probabilities: torch.Tensor  # (n, k) float32
    target_probabilities: torch.Tensor | None = None  # (n,) float32

    @property
    def top1(self) -> torch.Tensor:
        """The argmax token of each prompt: ``(n,)`` long."""
        return self.ids[:, 0]


def prompt_context(tokenizer, text: str, prepend_bos: bool | None = None) -> list[int]:
    """The token ids the model reads for ``text``, up to and including its last non-special token
    (a BOS in front is kept, an EOS a tokenizer appends is dropped)."""
    encoded = encode(tokenizer, text, prepend_bos=prepend_bos)
    real = [i for i, special in enumerate(encoded.special) if not special]
    if not real:
        raise ValueError(f"the prompt {text!r} has no tokens")
    return list(encoded.ids[: real[-1] + 1])


def target_context(tokenizer, prompt_text: str, target: str, prepend_bos: bool | None = None) -> tuple[list[int], int]:
    """``(context ids, target's first token id)`` from one tokenisation of ``prompt + " " + target``.

    The context is every token before the one holding the target's first character (the prompt's own
    tokens, BOS included when the model prepends one), so the prediction is read exactly where the model
    sees the target begin. Raises :class:`~keyscope._infra.errors.SubjectNotFound` if the target has no token of
    its own after the prompt.
    """
    ids, n_target = target_sequence(tokenizer, prompt_text, target, prepend_bos)
    first = len(ids) - n_target
    return ids[:first], ids[first]


def target_sequence(tokenizer, prompt_text: str, target: str, prepend_bos: bool | None = None) -> tuple[list[int], int]:
    """``(ids, n_target)``: one tokenisation of ``prompt + " " + target`` up to the target's last token, and
    how many of its final tokens belong to the target (those whose character span overlaps the target).

    Raises :class:`~keyscope._infra.errors.SubjectNotFound` if the target has no token of its own after the prompt.
    """
    target = target.strip()
    text = f"{prompt_text.rstrip()} {target}"
    start = len(text) - len(target)
    encoded = encode(tokenizer, text, prepend_bos=prepend_bos)
    hits = tokens_overlapping(encoded, start, len(text))
    if not hits or hits[0] == 0:
        raise SubjectNotFound(f"the target {target!r} has no token after the prompt {prompt_text!r}")
    return list(encoded.ids[: hits[-1] + 1]), hits[-1] + 1 - hits[0]


@dataclass(frozen=True)
class TargetScores:
    """Teacher-forced scores of ``n`` (prompt, target) sequences (CPU tensors):

    * ``log_probability`` ``(n,)``: ``Σ_t log P(target_t | prompt, target_<t)`` in float32;
    * ``top1`` ``(n,)`` bool: every target token is the argmax at its position;
    * ``argmax``: per sequence, the tuple of argmax tokens at the target positions.
    """

    log_probability: torch.Tensor
    top1: torch.Tensor
    argmax: tuple[tuple[int, ...], ...]


def target_runs(sequences: Sequence[tuple[Sequence[int], int]], batch_size: int = 32
                ) -> tuple[list[tuple[int, ...]], list[int], list[list[int]]]:
    """How :func:`score_targets` runs ``sequences``: ``(runs, run_of, batches)`` — the distinct inputs ``ids[:-1]``
    (``runs``, in first-seen order), the run of each sequence (``run_of[i]``), and the runs of each forward pass in
    order (``batches``, :func:`~keyscope.data.prompts.length_batches`; row ``j`` of pass ``b`` is run ``batches[b][j]``,
    right-padded to the pass's longest run)."""
    inputs: dict[tuple[int, ...], int] = {}
    run_of = [inputs.setdefault(tuple(ids[:-1]), len(inputs)) for ids, _ in sequences]
    runs = list(inputs)
    return runs, run_of, length_batches([len(run) for run in runs], batch_size)


@torch.no_grad()
def score_targets(model, sequences: Sequence[tuple[Sequence[int], int]], batch_size: int = 32) -> TargetScores:
    """Score ``(ids, n_target)`` sequences from :func:`target_sequence` (see :class:`TargetScores`).

    The logits at position ``t − 1`` predict token ``t``, so only ``ids[:-1]`` is run; sequences sharing it
    (one-token targets after the same prompt, such as a new and a true object) share one row. Rows run in
    right-padded, length-sorted batches with an attention mask. Row ``i`` belongs to ``sequences[i]``.
    """
    n = len(sequences)
    if any(n_target < 1 or n_target >= len(ids) for ids, n_target in sequences):
        raise ValueError("every sequence needs at least one context token and one target token")
    runs, run_of, batches = target_runs(sequences, batch_size)
    tokenizer = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    members: list[list[int]] = [[] for _ in runs]
    for i, r in enumerate(run_of):
        members[r].append(i)
    log_probability = torch.zeros(n, dtype=torch.float32)  # (n,)
    top1 = torch.zeros(n, dtype=torch.bool)  # (n,)
    argmax: list[tuple[int, ...]] = [()] * n
    device = model.cfg.device
    for batch in batches:
        input_ids, attention_mask = pad_batch([runs[r] for r in batch], pad_id, "right", device=device)
        logits = model(input_ids, attention_mask=attention_mask, return_type="logits")  # (batch, pos, vocab)
        for row, r in enumerate(batch):
            length = len(runs[r])  # = len(ids) - 1
            for i in members[r]:
                ids, n_target = sequences[i]
                logp = logits[row, length - n_target : length].float().log_softmax(-1)  # (n_target, vocab)
                wanted = torch.as_tensor(list(ids[len(ids) - n_target :]), device=logp.device)  # (n_target,)
                log_probability[i] = logp.gather(1, wanted[:, None]).sum().cpu()
                best = logp.argmax(-1)  # (n_target,)
                top1[i] = bool((best == wanted).all())
                argmax[i] = tuple(best.tolist())
    return TargetScores(log_probability, top1, tuple(argmax))


@torch.no_grad()
def next_token_top_k(
    model,
    contexts: Sequence[Sequence[int]],
    k: int = 1,
    batch_size: int = 32,
    targets: Sequence[int] | None = None,
    progress: bool = False,
) -> TopK:
    """Top-``k`` next tokens after each context (token ids as fed to the model) and their probabilities.

    Contexts are sorted by length and run in right-padded batches of ``batch_size``; the logits ``(batch,
    pos, vocab)`` are read at each row's last real token, ``P = softmax(logits)`` in float32. With
    ``targets`` (one token id per context) also returns ``P(target)``. Row ``i`` belongs to ``contexts[i]``.
    ``progress`` shows a bar over the batches (on stderr).
    """
    from tqdm.auto import tqdm

    n = len(contexts)
    if targets is not None and len(targets) != n:
        raise ValueError(f"got {n} contexts but {len(targets)} targets")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one token")
    tokenizer = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    k = min(k, int(model.cfg.d_vocab))
    ids = torch.zeros((n, k), dtype=torch.long)  # (n, k)
    probs = torch.zeros((n, k), dtype=torch.float32)  # (n, k)
    target_probs = torch.zeros(n, dtype=torch.float32) if targets is not None else None  # (n,)
    device = model.cfg.device
    batches = length_batches([len(c) for c in contexts], batch_size)
    for rows in tqdm(batches, desc="next-token predictions", unit="batch", disable=not progress, leave=False):
        input_ids, attention_mask = pad_batch([contexts[i] for i in rows], pad_id, "right", device=device)
        logits = model(input_ids, attention_mask=attention_mask, return_type="logits")  # (batch, pos, vocab)
        last = (attention_mask.sum(1) - 1).to(logits.device)  # (batch,)
        p = logits[torch.arange(len(rows), device=logits.device), last].float().softmax(-1)  # (batch, vocab)
        top = p.topk(k, dim=-1)  # (batch, k)
        index = torch.as_tensor(rows)
        ids[index], probs[index] = top.indices.cpu(), top.values.cpu()
        if target_probs is not None:
            wanted = torch.as_tensor([targets[i] for i in rows], device=p.device)  # (batch,)
            target_probs[index] = p.gather(1, wanted[:, None])[:, 0].cpu()
    return TopK(ids, probs, target_probs)


def decode_token(tokenizer, token_id: int) -> str:
    """One token as text (GPT-2's ``Ġ`` and SentencePiece's ``▁`` become the space they stand for)."""
    return tokenizer.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------- known facts


def predicts_target(
    model, facts: Sequence, target: str = "true", batch_size: int = 32, prepend_bos: bool | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Whether the model's top-1 next token after each fact's filled prompt is the first token of its
    ``target`` (``"true"`` or ``"new"``): a ``(n,)`` bool tensor.

    Prompts are sorted by length and run in right-padded batches with an attention mask; the logits are
    read at each prompt's last real token (:func:`target_context` gives both; ``progress``: a bar over the batches).
    """
    if target not in ("true", "new"):
        raise ValueError(f"target must be 'true' or 'new', not {target!r}")
    tokenizer = model.tokenizer
    pairs = []
    for fact in facts:
        answer = fact.target_true if target == "true" else fact.target_new
        if answer is None:
            raise ValueError(f"fact {fact.case_id} has no target_{target}")
        pairs.append(target_context(tokenizer, fact.filled_prompt, answer, prepend_bos))
    if not pairs:
        return torch.zeros(0, dtype=torch.bool)
    contexts = [context for context, _ in pairs]
    top1 = next_token_top_k(model, contexts, k=1, batch_size=batch_size, progress=progress).top1  # (n,)
    return top1 == torch.as_tensor([first for _, first in pairs])  # (n,)


def has_true_target(fact) -> bool:
    """Whether ``fact`` can be judged known at all: it has a ``target_true`` that is not blank."""
    return bool(fact.target_true and fact.target_true.strip())


def known_mask(model, facts: Sequence, batch_size: int = 32, prepend_bos: bool | None = None,
               progress: bool = False) -> torch.Tensor:
    """Which of ``facts`` the model knows (:func:`known_facts`): a ``(n,)`` bool tensor, ``False`` for a fact
    without a true target (not judged). Only the judged facts are run, in the batches :func:`predicts_target`
    makes of them."""
    judged = [i for i, fact in enumerate(facts) if has_true_target(fact)]
    mask = torch.zeros(len(facts), dtype=torch.bool)  # (n,)
    mask[judged] = predicts_target(model, [facts[i] for i in judged], "true", batch_size=batch_size,
                                   prepend_bos=prepend_bos, progress=progress)  # (judged,)
    return mask


def known_facts(model, facts: Sequence, batch_size: int = 32, prepend_bos: bool | None = None,
                progress: bool = False) -> list:
    """The facts whose true target's first token is the model's top-1 prediction after the filled prompt
    (the "known facts" filter of ROME and Yan et al.), in their original order.

    A multi-token target is judged by its first token alone, as ROME and Yan et al. judge it: ``"Los Angeles
    Lakers"`` is known when the top-1 next token is the one that begins it, whatever the model would predict
    after that. That token comes from :func:`target_context`: the prompt (trailing whitespace removed), one
    space and the target (stripped) are tokenised together, once, and the target's first token is the first
    token holding any of its characters, so the space before it goes with it where the tokenizer merges them
    (GPT-2's ``"ĠLos"``, SentencePiece's ``"▁Los"``) and stays in the context where it is a token of its own;
    the context is every token before it (BOS included where the model prepends one). The prediction is thus
    read exactly where the model would see the target begin. A fact without a ``target_true``, or with a blank
    one, is not judged and not known (:func:`has_true_target`).
    """
    known = known_mask(model, facts, batch_size=batch_size, prepend_bos=prepend_bos, progress=progress)
    return [fact for fact, ok in zip(facts, known.tolist()) if ok]


class UnknownFacts(KeyscopeError):
    """The model knows none of the facts to edit."""


def sample_known_facts(model, facts, n: int, seed: int = 0, batch_size: int = 64) -> tuple[list, int]:
    """``(chosen, n_known)``: up to ``n`` facts drawn with ``seed`` among those with a ``target_new`` other
    than ``target_true`` that the unedited model knows (top-1 on ``target_true``), in drawn order."""
    candidates = [f for f in facts if f.target_new and f.target_new.strip() != (f.target_true or "").strip()]
    known = known_facts(model, candidates, batch_size=batch_size)
    if not known:
        raise UnknownFacts(f"the model knows none of the {len(candidates)} facts with a new target "
                            f"(top-1 on the first token of target_true); nothing to edit")
    chosen = list(known)
    random.Random(seed).shuffle(chosen)
    return chosen[:n], len(known)
