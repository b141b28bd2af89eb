"""Causal tracing: where a model recalls a fact (Meng et al. 2022, "Locating and Editing Factual Associations
in GPT", §2 and Figure 1).

For a fact the model knows — its prompt ``x`` with the subject in it and the first token ``t`` of the true
target, the model's top-1 prediction after ``x`` — three runs are compared:

* the **clean** run, ``P* = P(t | x)``;
* the **corrupted** run: Gaussian noise ``ε ~ N(0, σ²I)`` is added to the token embeddings of every subject
  token (hook ``hook_embed``), ``σ = noise_scale · std`` of the subject tokens' embeddings over the traced
  facts (ROME's ``collect_embedding_std`` with ``noise_level = 3 · std``); ``P₀ = E_ε P(t | x, ε)``;
* the **restored** run: corrupted, but one hidden state ``h`` — the MLP output (``blocks.{l}.hook_mlp_out``)
  or the attention output (``blocks.{l}.hook_attn_out``) of layer ``l`` at token ``i`` — is put back to its
  clean value; ``P_h = E_ε P(t | x, ε, h clean)``.

The **indirect effect** of ``h`` is ``IE(h) = P_h − P₀`` (ROME's "indirect effect"; ``P* − P₀`` is the
total effect). Averaged over ``n`` known facts at the **subject's last token**, ``IE_mlp(l)`` profiles where
the subject's enrichment is written, and the layer with the largest average MLP effect is where ROME would edit
(:attr:`TraceResult.layer`). One state is restored at a time (ROME's Figure 1 restores a window of 10
layers; ``window`` sets that). The heat map (:func:`heatmap`) traces one fact at every token × layer.

``samples`` noise draws per fact are shared by every restoration of that fact (as ROME seeds the noise per
prompt), drawn from a ``torch.Generator`` seeded with ``(seed, fact index)``, so a trace is deterministic.
Prompts run in right-padded batches with an attention mask, each fact's ``samples`` corrupted rows side by
side, and the restorations of every layer run as rows of the same batches (a row per layer and draw), at most
``max_rows`` rows per forward pass; noise is stored once per draw, not per row.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from keyscope._infra.errors import KeyscopeError, SubjectNotFound
from keyscope.analysis.predictions import known_facts, target_context
from keyscope.data.datasets import Fact
from keyscope.data.prompts import encode, fill, pad_batch, tokens_overlapping
from keyscope.model.capture import Site, run_to
from keyscope.model.models import attn_out_hook, embed_hook, model_name, n_layers, value_hook

__all__ = ["TraceConfig", "TraceResult", "FactTrace", "trace_facts", "heatmap", "KINDS"]

#: The hidden states a trace restores: MLP outputs and attention outputs.
KINDS = ("mlp", "attn")


def _hook(kind: str, layer: int) -> str:
    return value_hook(layer) if kind == "mlp" else attn_out_hook(layer)


@dataclass(frozen=True)
class TraceConfig:
    """How a trace is run. No I/O. Defaults follow ROME's ``causal_trace.py`` except ``samples`` (ROME: 10)
    and ``window`` (ROME's Figure 1: 10)."""

    n: int = 200
    noise_scale: float = 3.0
    samples: int = 5
    window: int = 1
    seed: int = 0
    batch_size: int = 16  # facts traced together
    max_rows: int = 512  # rows (fact × layer × draw) per forward pass

    def __post_init__(self):
        if min(self.n, self.samples, self.window, self.batch_size, self.max_rows) < 1:
            raise ValueError("n, samples, window, batch_size and max_rows must be positive")
        if not math.isfinite(self.noise_scale) or self.noise_scale <= 0:
            raise ValueError(f"noise_scale must be a positive number, not {self.noise_scale}")


@dataclass(frozen=True)
class _Prompt:
    """One traced fact as token ids: the prompt, the subject's token span and the target's first token."""

    fact: Fact
    ids: tuple[int, ...]
    first: int  # first subject token
    last: int  # last subject token
    target: int


def _prompt(tokenizer, fact: Fact) -> _Prompt:
    context, target = target_context(tokenizer, fact.filled_prompt, fact.target_true)
    span = fill(fact.prompt, fact.subject)
    encoded = encode(tokenizer, span.text)
    hits = tokens_overlapping(encoded, span.start, span.end)
    if not hits or list(encoded.ids[: len(context)]) != list(context):
        raise SubjectNotFound(f"cannot trace {span.text!r}: the subject or the prompt does not tokenise on its own")
    return _Prompt(fact, tuple(context), hits[0], hits[-1], int(target))


@dataclass(frozen=True)
class FactTrace:
    """One fact's trace: clean and corrupted probabilities of the target and the indirect effect of every
    layer's MLP and attention output at the subject's last token (``(n_layers,)`` each)."""

    case_id: int | str
    p_clean: float
    p_corrupted: float
    mlp: tuple[float, ...]
    attn: tuple[float, ...]


@dataclass
class TraceResult:
    """The average indirect effects per layer (``indirect_effect[kind]``, ``(n_layers,)``), the layer with the
    largest MLP effect, the per-fact traces and the run's settings."""

    model: str
    n_layers: int
    facts: list[FactTrace] = field(repr=False)
    sigma: float
    config: TraceConfig
    n_known: int

    @property
    def indirect_effect(self) -> dict[str, list[float]]:
        return {kind: [float(np.mean([getattr(f, kind)[layer] for f in self.facts])) for layer in range(self.n_layers)]
                for kind in KINDS}

    @property
    def total_effect(self) -> float:
        return float(np.mean([f.p_clean - f.p_corrupted for f in self.facts]))

    @property
    def layer(self) -> int:
        """The layer whose MLP output at the subject's last token has the largest average indirect effect."""
        mlp = self.indirect_effect["mlp"]
        return max(range(self.n_layers), key=lambda layer: mlp[layer])

    def as_json(self) -> dict:
        return {"model": self.model, "n": len(self.facts), "n_known": self.n_known, "n_layers": self.n_layers,
                "layer": self.layer, "indirect_effect": self.indirect_effect, "total_effect": self.total_effect,
                "p_clean": float(np.mean([f.p_clean for f in self.facts])),
                "p_corrupted": float(np.mean([f.p_corrupted for f in self.facts])),
                "sigma": self.sigma, "noise_scale": self.config.noise_scale, "samples": self.config.samples,
                "window": self.config.window, "seed": self.config.seed}


def _embedding_std(model, prompts: Sequence[_Prompt]) -> float:
    """Standard deviation of the entries of the subject tokens' embeddings (ROME's ``collect_embedding_std``)."""
    W_E = model.W_E.detach()  # (d_vocab, d_model)
    ids = torch.as_tensor([i for p in prompts for i in p.ids[p.first : p.last + 1]], device=W_E.device)
    return float(W_E[ids].float().std())


def _noise(prompt_index: int, prompt: _Prompt, config: TraceConfig, sigma: float, d_model: int) -> torch.Tensor:
    """The ``samples`` noise draws of one fact: ``(samples, n_subject_tokens, d_model)`` float32."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + prompt_index)
    shape = (config.samples, prompt.last - prompt.first + 1, d_model)
    return torch.randn(shape, generator=generator) * sigma


def _restored_layers(layer: int, window: int, total: int) -> range:
    """The layers restored for ``layer`` with a ``window`` (centred as ROME's ``trace_important_window``)."""
    return range(max(0, layer - window // 2), min(total, layer - (-window // 2)))


#: Patches of one hook: rows, positions and the clean values ``(n, d_model)`` put there.
Patch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.no_grad()
def _probabilities(model, rows: list[tuple[int, ...]], last: list[int], targets: list[int],
                   noise: tuple[torch.Tensor, torch.Tensor] | None, patches: dict[str, Patch],
                   max_rows: int = 512) -> torch.Tensor:
    """P(target) at each row's ``last`` position ``(rows,)``. ``noise = (draws, draw_of_row)`` adds
    ``draws[draw_of_row[j]]`` ``(pos, d_model)`` to row ``j``'s embeddings; for each hook in ``patches`` the
    activation at ``(rows[j], positions[j])`` is set to ``values[j]``. At most ``max_rows`` rows per forward pass."""
    out = []
    for lo in range(0, len(rows), max_rows):
        hi = min(len(rows), lo + max_rows)
        chunk: dict[str, Patch] = {}
        for name, (patch_rows, positions, values) in patches.items():
            inside = (patch_rows >= lo) & (patch_rows < hi)
            if bool(inside.any()):
                chunk[name] = (patch_rows[inside] - lo, positions[inside], values[inside])
        chunk_noise = None if noise is None else (noise[0], noise[1][lo:hi])
        out.append(_probabilities_once(model, rows[lo:hi], last[lo:hi], targets[lo:hi], chunk_noise, chunk))
    return torch.cat(out)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _probabilities_once(model, rows, last, targets, noise, patches: dict[str, Patch]) -> torch.Tensor:
    device = model.cfg.device
    input_ids, mask = pad_batch(rows, _pad_id(model.tokenizer), "right", device=device)  # (rows, pos)
    hooks = []
    if noise is not None:
        added = noise[0][noise[1]].to(device)  # (rows, pos', d_model)

        def corrupt(act, hook):
            width = min(act.shape[1], added.shape[1])
            act = act.clone()
            act[:, :width] += added[:, :width].to(act.dtype)
            return act

        hooks.append((embed_hook(), corrupt))
    for name, (patch_rows, positions, values) in patches.items():
        r, p = patch_rows.to(device), positions.to(device)

        def patch(act, hook, r=r, p=p, values=values):
            act = act.clone()
            act[r, p] = values.to(act.device, act.dtype)
            return act

        hooks.append((name, patch))
    with model.hooks(fwd_hooks=hooks):
        logits = model(input_ids, attention_mask=mask)  # (rows, pos, vocab)
    index = torch.arange(len(rows), device=logits.device)
    probs = logits[index, torch.as_tensor(last, device=logits.device)].float().softmax(-1)  # (rows, vocab)
    return probs.gather(1, torch.as_tensor(targets, device=probs.device)[:, None])[:, 0].cpu()


def _restorations(kind: str, n_layers_: int, window: int, clean: dict[str, torch.Tensor],
                  states: Sequence[tuple[int, int]], samples: int) -> dict[str, Patch]:
    """The patches that restore, for each traced state ``states[u] = (batch row of the clean run, position)``
    and each layer ``l``, the clean ``kind`` outputs of the layers around ``l`` (``window``) in the ``samples``
    corrupted rows ``(u * n_layers + l) * samples + s``."""
    entries: dict[str, tuple[list[int], list[int], list[int], list[int]]] = {}
    for u, (batch_row, position) in enumerate(states):
        for layer in range(n_layers_):
            for restored in _restored_layers(layer, window, n_layers_):
                rows, positions, sources, source_positions = entries.setdefault(_hook(kind, restored), ([], [], [], []))
                for s in range(samples):
                    rows.append((u * n_layers_ + layer) * samples + s)
                    positions.append(position)
                    sources.append(batch_row)
                    source_positions.append(position)
    return {name: (torch.tensor(rows), torch.tensor(positions), clean[name][torch.tensor(sources), torch.tensor(src_pos)])
            for name, (rows, positions, sources, src_pos) in entries.items()}


@torch.no_grad()
def _clean_states(model, prompts: Sequence[_Prompt]) -> dict[str, torch.Tensor]:
    """Every layer's MLP and attention outputs of the clean runs: ``hook name -> (batch, pos, d_model)`` (one forward
    pass stopped after the last of them, :func:`keyscope.model.capture.run_to`)."""
    input_ids, mask = pad_batch([p.ids for p in prompts], _pad_id(model.tokenizer), "right", device=model.cfg.device)
    names = {_hook(kind, layer) for kind in KINDS for layer in range(n_layers(model))}
    return run_to(model, input_ids, [Site(name, torch.Tensor.detach) for name in sorted(names)], mask)


def _trace_batch(model, prompts: Sequence[_Prompt], offset: int, config: TraceConfig, sigma: float) -> list[FactTrace]:
    S, L, d = config.samples, n_layers(model), int(model.cfg.d_model)
    clean = _clean_states(model, prompts)
    p_clean = _probabilities(model, [p.ids for p in prompts], [len(p.ids) - 1 for p in prompts],
                             [p.target for p in prompts], None, {}, config.max_rows)
    width = max(len(p.ids) for p in prompts)
    draws = torch.zeros((len(prompts) * S, width, d))  # (facts × draws, pos, d_model): draw s of fact i at i * S + s
    for i, p in enumerate(prompts):
        draws[i * S : (i + 1) * S, p.first : p.last + 1] = _noise(offset + i, p, config, sigma, d)

    def corrupted_rows(repeats: int):
        """``repeats`` blocks of ``S`` corrupted rows per fact: ids, last positions, targets, draw of each row."""
        order = [(i, s) for i in range(len(prompts)) for _ in range(repeats) for s in range(S)]
        return ([prompts[i].ids for i, _ in order], [len(prompts[i].ids) - 1 for i, _ in order],
                [prompts[i].target for i, _ in order], (draws, torch.tensor([i * S + s for i, s in order])))

    ids, last, targets, noise = corrupted_rows(1)
    p_corrupted = _probabilities(model, ids, last, targets, noise, {}, config.max_rows).view(len(prompts), S).mean(1)
    effects = {}
    ids, last, targets, noise = corrupted_rows(L)  # row (fact i, layer l, draw s) = (i * L + l) * S + s
    states = [(i, p.last) for i, p in enumerate(prompts)]
    for kind in KINDS:
        patches = _restorations(kind, L, config.window, clean, states, S)
        probs = _probabilities(model, ids, last, targets, noise, patches, config.max_rows)
        effects[kind] = probs.view(len(prompts), L, S).mean(2) - p_corrupted[:, None]  # (facts, L)
    return [FactTrace(p.fact.case_id, float(p_clean[i]), float(p_corrupted[i]),
                      tuple(effects["mlp"][i].tolist()), tuple(effects["attn"][i].tolist()))
            for i, p in enumerate(prompts)]


def _traceable(model, facts: Sequence[Fact], config: TraceConfig) -> tuple[list[_Prompt], int]:
    """Up to ``config.n`` known facts (top-1 on the true target's first token), drawn with the seed, as prompts."""
    candidates = [f for f in facts if f.target_true and f.target_true.strip()]
    known = known_facts(model, candidates, batch_size=64)
    if not known:
        raise KeyscopeError(f"the model knows none of the {len(candidates)} facts (top-1 on the first token of "
                            f"target_true); nothing to trace")
    random.Random(config.seed).shuffle(known)
    prompts = []
    for fact in known:
        if len(prompts) == config.n:
            break
        try:
            prompts.append(_prompt(model.tokenizer, fact))
        except SubjectNotFound:
            continue
    if not prompts:
        raise KeyscopeError("none of the known facts can be traced (their subjects do not tokenise on their own)")
    return prompts, len(known)


def trace_facts(model, facts: Sequence[Fact], config: TraceConfig | None = None, progress: bool = True) -> TraceResult:
    """Trace ``config.n`` known facts of ``facts`` at the subject's last token (module docstring)."""
    from tqdm.auto import tqdm

    config = config or TraceConfig()
    prompts, n_known = _traceable(model, facts, config)
    sigma = config.noise_scale * _embedding_std(model, prompts)
    traces: list[FactTrace] = []
    starts = range(0, len(prompts), config.batch_size)
    for start in tqdm(starts, desc="causal trace", disable=not progress, leave=False):
        traces += _trace_batch(model, prompts[start : start + config.batch_size], start, config, sigma)
    return TraceResult(model_name(model), n_layers(model), traces, sigma, config, n_known)


@dataclass(frozen=True)
class Heatmap:
    """One fact traced at every token × layer: ``effects[kind]`` is ``(n_tokens, n_layers)`` (the indirect
    effect of restoring that token's state at that layer), ``tokens`` the decoded tokens, ``subject`` the
    subject's token span ``[first, last]``."""

    case_id: int | str
    tokens: tuple[str, ...]
    subject: tuple[int, int]
    effects: dict[str, np.ndarray]
    p_clean: float
    p_corrupted: float


@torch.no_grad()
def heatmap(model, fact: Fact, config: TraceConfig | None = None, sigma: float | None = None) -> Heatmap:
    """Trace one fact at every token and layer (ROME's Figure 1), with ``sigma`` (default: from the fact's own
    subject tokens) and ``config``'s noise draws."""
    config = config or TraceConfig()
    prompt = _prompt(model.tokenizer, fact)
    sigma = config.noise_scale * _embedding_std(model, [prompt]) if sigma is None else sigma
    S, L, d, P = config.samples, n_layers(model), int(model.cfg.d_model), len(prompt.ids)
    clean = _clean_states(model, [prompt])
    p_clean = float(_probabilities(model, [prompt.ids], [P - 1], [prompt.target], None, {})[0])
    draws = torch.zeros((S, P, d))  # (draws, pos, d_model)
    draws[:, prompt.first : prompt.last + 1] = _noise(0, prompt, config, sigma, d)
    p_corrupted = float(_probabilities(model, [prompt.ids] * S, [P - 1] * S, [prompt.target] * S,
                                       (draws, torch.arange(S)), {}, config.max_rows).mean())
    effects = {}
    n_rows = P * L * S  # row (token i, layer l, draw s) = (i * L + l) * S + s
    noise = (draws, torch.arange(S).repeat(P * L))
    for kind in KINDS:
        patches = _restorations(kind, L, config.window, clean, [(0, i) for i in range(P)], S)
        probs = _probabilities(model, [prompt.ids] * n_rows, [P - 1] * n_rows, [prompt.target] * n_rows, noise,
                               patches, config.max_rows)
        effects[kind] = (probs.view(P, L, S).mean(2) - p_corrupted).numpy()
    tokens = tuple(model.tokenizer.decode([i]) for i in prompt.ids)
    return Heatmap(fact.case_id, tokens, (prompt.first, prompt.last), effects, p_clean, p_corrupted)
