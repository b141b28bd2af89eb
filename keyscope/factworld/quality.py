"""How well a factworld model knows its world: top-1 accuracy on the facts under every kind of subject form.

``accuracy`` reports, as fractions:

* ``canonical`` — every fact, every template, canonical subject name (the quality bar: ≥ 99%);
* ``trained_aliases`` — every fact and template through each alias the model read facts under (≥ 95%);
* ``alias_only`` — forms the model only saw in ``X is also known as Y`` statements (reported, no bar);
* ``shuffled`` — the subject's words in a random non-identity order (reported);
* ``long_context`` — the canonical prompt after 300 tokens of unrelated filler (reported).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from keyscope._infra.errors import KeyscopeError
from keyscope.factworld import corpus
from keyscope.factworld.world import World

LONG_CONTEXT_TOKENS = 300


def _logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "original_model"):  # a TransformerBridge
        return model(input_ids, attention_mask=attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


@torch.no_grad()
def top1_accuracy(
    model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 256, desc: str | None = None
) -> float:
    """Fraction of ``prompts`` whose next-token argmax is the single-token ``targets``."""
    if not prompts:
        return float("nan")
    device = next(model.parameters()).device
    target_ids = torch.tensor([target_id(tokenizer, t) for t in targets])
    correct = 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
        ids = enc["input_ids"].to(device)  # (batch, pos)
        mask = enc["attention_mask"].to(device)  # (batch, pos)
        logits = _logits(model, ids, mask)  # (batch, pos, vocab)
        last = mask.sum(1) - 1  # (batch,) right padding: last real token
        pred = logits[torch.arange(len(idx)), last].argmax(-1).cpu()  # (batch,)
        correct += int((pred == target_ids[idx]).sum())
    return correct / len(prompts)


def target_id(tokenizer, target: str) -> int:
    """The one token of ``target`` as it follows a prompt (after a space); a one-line
    :class:`~keyscope._infra.errors.KeyscopeError` if it has several (factworld's targets are single tokens)."""
    ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise KeyscopeError(f"factworld target {target!r} is {len(ids)} tokens, not one; is this factworld's tokenizer?")
    return int(ids[0])


def shuffled_form(rng: random.Random, name: str, exclude: frozenset[str] = frozenset()) -> str | None:
    """The subject's words in a random order different from the original and from every form in ``exclude``
    (other subjects' names: an order twin's name is no shuffle); ``None`` if there is no such order."""
    words = name.split()
    orders = [" ".join(p) for p in itertools.permutations(words)]
    allowed = [o for o in dict.fromkeys(orders) if o != name and o not in exclude]
    return rng.choice(allowed) if allowed else None


def _prompt_sets(world: World, seed: int, n_long: int) -> dict[str, tuple[list[str], list[str]]]:
    rng = random.Random(f"quality-{seed}")
    sets: dict[str, tuple[list[str], list[str]]] = {k: ([], []) for k in (
        "canonical", "trained_aliases", "alias_only", "shuffled", "long_context"
    )}

    def add(kind: str, prompts: Iterable[str], target: str) -> None:
        for p in prompts:
            sets[kind][0].append(p)
            sets[kind][1].append(target)

    filler_rng = random.Random(f"quality-filler-{seed}")
    long_ids = set(rng.sample(range(len(world.facts)), min(n_long, len(world.facts))))
    names = frozenset(s.name for s in world.subjects)
    for fact in world.facts:
        subject = world.subject(fact.subject_id)
        templates = world.relation(fact.relation_id).templates
        add("canonical", (t.format(subject.name) for t in templates), fact.target)
        add("trained_aliases", (t.format(a) for t in templates for a in subject.trained_aliases), fact.target)
        template = rng.choice(templates)
        add("alias_only", (template.format(a) for a in subject.alias_only), fact.target)
        shuffled = shuffled_form(rng, subject.name, names)
        add("shuffled", [template.format(shuffled)] if shuffled else [], fact.target)
        if fact.case_id in long_ids:
            context = corpus.filler_text(filler_rng, LONG_CONTEXT_TOKENS, world, 0.0).split()[:LONG_CONTEXT_TOKENS]
            add("long_context", [" ".join(context) + " " + template.format(subject.name)], fact.target)
    return sets


def evaluate(model, tokenizer, world: World, seed: int = 0, n_long: int = 500, progress: bool = True) -> dict:
    """Top-1 accuracy of ``model`` on ``world`` for every prompt kind (see module docstring)."""
    accuracy = {}
    for kind, (prompts, targets) in _prompt_sets(world, seed, n_long).items():
        batch = 32 if kind == "long_context" else 256
        accuracy[kind] = top1_accuracy(model, tokenizer, prompts, targets, batch, desc=kind if progress else None)
    return accuracy
