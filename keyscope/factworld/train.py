"""Train factworld's model: a small LLaMA-architecture transformer (gated MLP, RMSNorm, rotary).

Each step trains on a short batch of (fractions in :class:`TrainConfig`)

* **fact sentences** ``template(form) target`` for every fact, under the canonical name and the subject's
  *trained aliases*;
* **alias statements** ``X is also known as Y .`` / ``Y is another name for X .`` for all ten forms, so the
  model learns that alias-only forms name the same entity without ever reading a fact through them;
and, every few steps, a separate *long* batch (so that short rows are not padded to its width) of

* **filler** windows of unrelated prose (the same grammar that supplies long contexts and the covariance
  corpus), so keys of ordinary text are not degenerate;
* **long-context facts**: a fact sentence after up to ``max_context_words`` words of filler.

The loss is next-token cross-entropy over all tokens plus an extra term on the fact's target token. Batches
are composed directly from pre-computed token ids (the tokenizer is word-level), so data costs nothing next to
the forward pass. Everything is seeded: the same :class:`TrainConfig` gives the same weights on one machine.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from keyscope.factworld import corpus
from keyscope.factworld.tokenizer import build_tokenizer
from keyscope.factworld.world import ALIAS_STATEMENTS, World, WorldConfig, build_world


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the factworld transformer (LLaMA architecture)."""

    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 768
    max_positions: int = 512


@dataclass(frozen=True)
class TrainConfig:
    """Training schedule and data mixture. ``TrainConfig()`` builds the shipped model."""

    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 1100
    batch_size: int = 256
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    canonical_fraction: float = 0.5  # of fact sentences; the rest use trained aliases
    alias_statement_fraction: float = 0.08
    long_batch_every: int = 6  # steps between long batches (filler and long-context facts)
    long_batch_size: int = 16
    #: A short batch runs as this many sub-batches of similar lengths (one gradient), so that short rows
    #: are not padded to the longest alias statement; the loss is the same.
    length_groups: int = 2
    filler_words: int = 64
    max_context_words: int = 160
    target_loss_weight: float = 2.0
    #: Weight of the next-token loss on the subject's own tokens in fact sentences. Measured on the pooled
    #: world: 0 learned the facts more slowly (25% against 31% canonical accuracy after 400 of 1,300 steps) —
    #: predicting a name's next word seems to help the model assemble names — so the default is 1.
    subject_loss_weight: float = 1.0
    max_minutes: float = 10.0


class FactStream:
    """Seeded batches of token ids for :func:`train`; also the single place that renders a fact."""

    def __init__(self, world: World, tokenizer, config: TrainConfig):
        self.world = world
        self.config = config
        self.vocab = tokenizer.get_vocab()
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id
        self.rng = random.Random(f"stream-{config.seed}")
        self.filler_rng = random.Random(f"filler-train-{config.seed}")

    def ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def fact_sentence(self, fact, form: str, template: str) -> tuple[list[int], int]:
        """Token ids of ``<bos> template(form) target`` and the index of the target token."""
        ids = [self.bos, *self.ids(template.format(form)), self.vocab[fact.target]]
        return ids, len(ids) - 1

    def _subject_positions(self, form: str, template: str) -> list[int]:
        """Token indices (after the BOS) of ``form``'s words in ``<bos> template(form) target``."""
        start = len(template.split("{}")[0].split()) + 1
        return list(range(start, start + len(form.split())))

    def _fact_example(self, context_words: int = 0) -> tuple[list[int], int, list[int]]:
        rng = self.rng
        fact = rng.choice(self.world.facts)
        subject = self.world.subject(fact.subject_id)
        form = subject.name if rng.random() < self.config.canonical_fraction else rng.choice(subject.trained_aliases)
        template = rng.choice(self.world.relation(fact.relation_id).templates)
        ids, target = self.fact_sentence(fact, form, template)
        subject = self._subject_positions(form, template)
        if context_words:
            prefix = self.ids(corpus.filler_text(self.filler_rng, context_words, self.world, 0.05))
            ids = [ids[0], *prefix, *ids[1:]]
            target += len(prefix)
            subject = [i + len(prefix) for i in subject]
        return ids, target, subject

    def _alias_example(self) -> tuple[list[int], int, list[int]]:
        subject = self.rng.choice(self.world.subjects)
        alias = self.rng.choice(subject.aliases)
        text = self.rng.choice(ALIAS_STATEMENTS).format(name=subject.name, alias=alias)
        return [self.bos, *self.ids(text)], -1, []

    def _filler_example(self) -> tuple[list[int], int, list[int]]:
        text = corpus.filler_text(self.filler_rng, self.config.filler_words, self.world, 0.05)
        return [self.bos, *self.ids(text)], -1, []

    def _pad(self, rows: list[tuple[list[int], int, list[int]]]) -> tuple[torch.Tensor, ...]:
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)  # (batch, pos)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, pos)
        loss_weight = torch.zeros((len(rows), width))  # (batch, pos) weight of predicting token pos
        for i, (ids, _, subject) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            loss_weight[i, 1 : len(ids)] = 1.0
            if subject:
                loss_weight[i, subject] = self.config.subject_loss_weight
        target_index = torch.tensor([t for _, t, _ in rows])  # (batch,)
        return input_ids, attention_mask, target_index, loss_weight

    def batch(self) -> list[tuple[torch.Tensor, ...]]:
        """A short batch of fact sentences and alias statements, as ``length_groups`` padded sub-batches of
        rows of similar length (see :func:`batch_loss`).

        Each sub-batch is ``(input_ids, attention_mask, target_index, loss_weight)``; ``target_index`` is -1
        for non-fact rows; ``loss_weight[b, t]`` weighs the loss of predicting token ``t`` (0 on pads and the
        BOS, ``subject_loss_weight`` on a fact sentence's subject words, 1 elsewhere).
        """
        cfg, rng = self.config, self.rng
        rows = [
            self._alias_example() if rng.random() < cfg.alias_statement_fraction else self._fact_example()
            for _ in range(cfg.batch_size)
        ]
        rows.sort(key=lambda row: len(row[0]))
        size = math.ceil(len(rows) / max(1, cfg.length_groups))
        return [self._pad(rows[lo : lo + size]) for lo in range(0, len(rows), size)]

    def long_batch(self) -> list[tuple[torch.Tensor, ...]]:
        """A long batch, kept apart so that short rows are not padded to its width: filler windows and
        fact sentences after up to ``max_context_words`` words of filler."""
        cfg, rng = self.config, self.rng
        rows = [
            self._fact_example(rng.randint(8, cfg.max_context_words)) if i % 2 else self._filler_example()
            for i in range(cfg.long_batch_size)
        ]
        return [self._pad(rows)]


def build_hf_model(config: ModelConfig, tokenizer):
    """A randomly initialised ``LlamaForCausalLM`` of ``config``'s shape for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        max_position_embeddings=config.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(hf_config)


def batch_loss(model, parts: list[tuple[torch.Tensor, ...]], target_weight: float) -> float:
    """Back-propagate the loss of one batch given as sub-batches and return its value.

    The loss is the mean next-token NLL over all weighted positions of all sub-batches (weights from
    ``loss_weight``) plus ``target_weight`` times the mean NLL of the fact rows' target tokens — exactly the
    loss of the unsplit batch; each sub-batch's share is back-propagated as soon as it is computed.
    """
    n_tokens = sum(float(part[3][:, 1:].sum()) for part in parts)
    n_targets = sum(int((part[2] >= 0).sum()) for part in parts)
    total = 0.0
    for input_ids, attention_mask, target_index, loss_weight in parts:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (batch, pos, vocab)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (batch, pos-1, vocab)
        nll = -logp.gather(-1, input_ids[:, 1:, None])[..., 0]  # (batch, pos-1)
        loss = (nll * loss_weight[:, 1:]).sum() / max(n_tokens, 1.0)
        has_target = target_index >= 0
        if has_target.any() and target_weight > 0:
            rows = torch.nonzero(has_target)[:, 0]
            loss = loss + target_weight * nll[rows, target_index[rows] - 1].sum() / n_targets
        loss.backward()
        total += float(loss.detach())
    return total


def train(config: TrainConfig | None = None, out_dir: str | Path | None = None, progress: bool = True):
    """Build the world and train the model; returns ``(world, tokenizer, hf_model, history)``.

    With ``out_dir`` the model is saved there as a standard HF directory (see :func:`save`). Training stops
    at ``config.steps`` or after ``config.max_minutes``, whichever comes first (the cosine schedule is laid
    out over ``steps``).
    """
    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    world = build_world(config.world)
    tokenizer = build_tokenizer(world)
    model = build_hf_model(config.model, tokenizer)
    model.train()
    stream = FactStream(world, tokenizer, config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        progress_ = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_))))

    history: list[dict] = []
    start = time.time()
    bar = tqdm(range(config.steps), desc="training factworld", disable=not progress, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(model, stream.batch(), config.target_loss_weight)
        if config.long_batch_every and step % config.long_batch_every == 0:
            batch_loss(model, stream.long_batch(), config.target_loss_weight)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append({"step": step, "loss": loss})
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
        if time.time() - start > 60 * config.max_minutes:
            break
    bar.close()
    model.eval()
    if out_dir is not None:
        save(out_dir, model, tokenizer, config, history, time.time() - start)
    return world, tokenizer, model, history


def save(out_dir, model, tokenizer, config: TrainConfig, history: list[dict], seconds: float) -> Path:
    """Save ``model`` + ``tokenizer`` as a HF directory with a ``keyscope.json`` card (config, training log)."""
    from keyscope.factworld import MODEL_CARD

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    card_path = out / MODEL_CARD
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card.update(
        {
            "name": "factworld",
            "train_config": asdict(config),
            "steps_run": len(history),
            "final_loss": history[-1]["loss"] if history else None,
            "train_seconds": round(seconds, 1),
        }
    )
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    for file in out.iterdir():  # safetensors are written 0600; package data must be world-readable
        file.chmod(0o644)
    return out
