"""Find where factworld's model stores its facts: a causal trace of MLP outputs at the subject's last token.

ROME (Meng et al. 2022, §2) locates factual recall by *causal tracing*: corrupt the subject's token embeddings
with Gaussian noise (σ = 3 × the embeddings' standard deviation), then restore one hidden state from the
clean run and see how much of the correct answer's probability comes back. Restoring the MLP output of layer
``l`` at the subject's last token gives the *indirect effect* of that MLP,

    IE(l) = P_restored(l)[target] − P_corrupted[target],

and the edit layer is the one with the largest average IE. This module runs that sweep on a Hugging Face
LLaMA model with plain torch hooks (factworld sits below the analysis modules, so it uses no TransformerLens
machinery); the found layer is recorded in the model card as ``default_layer``.
"""

from __future__ import annotations

import random

import torch

from keyscope.factworld.world import World


def _subject_prompts(world: World, n: int, seed: int):
    rng = random.Random(f"trace-{seed}")
    for fact in rng.sample(world.facts, min(n, len(world.facts))):
        subject = world.subject(fact.subject_id)
        template = rng.choice(world.relation(fact.relation_id).templates)
        before, _ = template.split("{}")
        yield template.format(subject.name), len(before.split()), len(subject.words), fact.target


def _restored_probability(model, ids, noise, first: int, last: int, target_id: int,
                          restore: tuple[int, torch.Tensor] | None) -> float:
    """P(target) with the subject embeddings ``[first, last]`` corrupted by ``noise`` and, if ``restore`` is
    ``(layer, clean_mlp_output)``, that layer's MLP output at ``last`` put back to its clean value."""
    layers = model.model.layers

    def corrupt(_module, _inp, out):
        out = out.clone()
        out[0, first : last + 1] += noise
        return out

    def put_back(_module, _inp, out):
        out = out.clone()
        out[0, last] = restore[1]
        return out

    handles = [model.get_input_embeddings().register_forward_hook(corrupt)]
    if restore is not None:
        handles.append(layers[restore[0]].mlp.register_forward_hook(put_back))
    try:
        logits = model(input_ids=ids).logits[0, -1]  # (vocab,)
    finally:
        for h in handles:
            h.remove()
    return float(torch.softmax(logits.float(), -1)[target_id])


@torch.no_grad()
def trace_mlp_layers(model, tokenizer, world: World, n_prompts: int = 120, noise_scale: float = 3.0, seed: int = 0):
    """Average indirect effect of each layer's MLP output at the subject's last token: a list per layer."""
    layers = model.model.layers
    embed = model.get_input_embeddings()
    sigma = noise_scale * float(embed.weight.std())
    gen = torch.Generator().manual_seed(seed)
    effects = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    for prompt, n_before, n_subject, target in _subject_prompts(world, n_prompts, seed):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, pos); position 0 is <bos>
        first, last = 1 + n_before, n_before + n_subject  # subject token span [first, last]
        target_id = tokenizer.convert_tokens_to_ids(target)
        clean_out: dict[int, torch.Tensor] = {}
        handles = [
            layer.mlp.register_forward_hook(
                lambda _m, _i, out, i=i, store=clean_out, pos=last: store.__setitem__(i, out[0, pos].clone())
            )
            for i, layer in enumerate(layers)
        ]
        try:
            model(input_ids=ids)
        finally:
            for h in handles:
                h.remove()
        noise = torch.randn((n_subject, embed.weight.shape[1]), generator=gen) * sigma  # (n_subject, d_model)
        corrupted = _restored_probability(model, ids, noise, first, last, target_id, None)
        for i in range(len(layers)):
            restored = _restored_probability(model, ids, noise, first, last, target_id, (i, clean_out[i]))
            effects[i] += restored - corrupted
        count += 1
    return (effects / max(count, 1)).tolist()


def best_layer(effects: list[float]) -> int:
    """The layer with the largest average indirect effect."""
    return max(range(len(effects)), key=lambda i: effects[i])
