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

The loss is next-token cross-entropy over all tokens plus an extra term on the fact's target token. A fact
sentence is tokenised piece by piece (the template's words before the subject, the subject form, the words
after it, the target; each piece is tokenised once and cached), which gives exactly the tokens of the whole
sentence — both tokenizers split at spaces — and the subject's token span for free.

Training is deterministic **in steps**: ``steps`` optimiser steps are always run, whatever the machine's
speed, and the same :class:`TrainConfig` gives the same weights on one machine and device type.
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
from keyscope.factworld.tokenizer import TokenizerConfig, build_tokenizer
from keyscope.factworld.world import ALIAS_STATEMENTS, World, WorldConfig, build_world


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the factworld transformer (LLaMA architecture)."""

    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    d_mlp: int = 512
    max_positions: int = 512


@dataclass(frozen=True)
class TrainConfig:
    """Training schedule and data mixture. ``TrainConfig()`` builds the shipped model."""

    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    steps: int = 1200
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
    length_groups: int = 3
    filler_words: int = 64
    max_context_words: int = 160
    target_loss_weight: float = 2.0
    #: Weight of the next-token loss on the subject's own tokens in fact sentences (1: like every token).
    subject_loss_weight: float = 1.0
    #: Language-only steps before the facts: filler prose that mentions subjects, and alias statements.
    lm_steps: int = 150
    #: The token embeddings and this many lowest blocks learn in the language-only steps only: they stay
    #: general-purpose text processing, as the lowest layers of a pretrained LM are.
    frozen_blocks: int = 1
    #: Fraction of fact rows written as a *record*: a subject form directly followed by its targets in relation
    #: order (``form t_1 t_2 … t_R .``), so that the first target is predicted at the subject's last token.
    record_fraction: float = 0.25

    def __post_init__(self):
        if self.steps < 1 or self.warmup < 1:
            raise ValueError("steps and warmup must be positive")
        if self.batch_size < 4:
            raise ValueError(f"batch_size must be at least 4 (a language batch holds batch_size // 4 rows), not {self.batch_size}")


Row = tuple[list[int], int, list[int]]  # token ids, index of the target token (-1: none), subject positions


class FactStream:
    """Seeded batches of token ids for :func:`train`; also the single place that renders a fact."""

    def __init__(self, world: World, tokenizer, config: TrainConfig):
        self.world = world
        self.config = config
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id
        self.rng = random.Random(f"stream-{config.seed}")
        self.filler_rng = random.Random(f"filler-train-{config.seed}")
        self._cache: dict[str, tuple[int, ...]] = {}

    def ids(self, text: str) -> tuple[int, ...]:
        """Token ids of ``text`` without special tokens (cached: fact pieces repeat)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def fact_sentence(self, fact, form: str, template: str) -> tuple[list[int], int, list[int]]:
        """Token ids of ``<bos> template(form) target``, the index of the target's (first) token and the
        positions of the subject form's tokens."""
        before, after = template.split("{}")
        head = [self.bos, *(self.ids(before.rstrip()) if before.strip() else ())]
        subject = self.ids(form)
        ids = [*head, *subject, *(self.ids(after) if after.strip() else ()), *self.ids(fact.target)]
        target = len(ids) - len(self.ids(fact.target))
        return ids, target, list(range(len(head), len(head) + len(subject)))

    def _record_example(self) -> Row:
        subject = self.rng.choice(self.world.subjects)
        form = subject.name if self.rng.random() < self.config.canonical_fraction else self.rng.choice(subject.trained_aliases)
        head = [self.bos, *self.ids(form)]
        targets = [t for fact in self.world.facts_of(subject.subject_id) for t in self.ids(fact.target)]
        return [*head, *targets, *self.ids(".")], len(head), list(range(1, len(head)))

    def _fact_example(self, context_words: int = 0) -> Row:
        rng = self.rng
        if not context_words and self.config.record_fraction and rng.random() < self.config.record_fraction:
            return self._record_example()
        fact = rng.choice(self.world.facts)
        subject = self.world.subject(fact.subject_id)
        form = subject.name if rng.random() < self.config.canonical_fraction else rng.choice(subject.trained_aliases)
        template = rng.choice(self.world.relation(fact.relation_id).templates)
        ids, target, positions = self.fact_sentence(fact, form, template)
        if context_words:
            prefix = self.ids_uncached(corpus.filler_text(self.filler_rng, context_words, self.world, 0.05))
            ids = [ids[0], *prefix, *ids[1:]]
            target += len(prefix)
            positions = [i + len(prefix) for i in positions]
        return ids, target, positions

    def ids_uncached(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _alias_example(self) -> Row:
        subject = self.rng.choice(self.world.subjects)
        alias = self.rng.choice(subject.aliases)
        text = self.rng.choice(ALIAS_STATEMENTS).format(name=subject.name, alias=alias)
        return [self.bos, *self.ids(text)], -1, []

    def _filler_example(self) -> Row:
        text = corpus.filler_text(self.filler_rng, self.config.filler_words, self.world, 0.05)
        return [self.bos, *self.ids_uncached(text)], -1, []

    def _pad(self, rows: list[Row]) -> tuple[torch.Tensor, ...]:
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
        BOS, ``subject_loss_weight`` on a fact sentence's subject tokens, 1 elsewhere).
        """
        cfg, rng = self.config, self.rng
        rows = [
            self._alias_example() if rng.random() < cfg.alias_statement_fraction else self._fact_example()
            for _ in range(cfg.batch_size)
        ]
        rows.sort(key=lambda row: len(row[0]))
        size = math.ceil(len(rows) / max(1, cfg.length_groups))
        return [self._pad(rows[lo : lo + size]) for lo in range(0, len(rows), size)]

    def lm_batch(self) -> list[tuple[torch.Tensor, ...]]:
        """A language-only batch: filler windows that mention subjects, and alias statements."""
        cfg, rng = self.config, self.rng
        rows = []
        for _ in range(cfg.batch_size // 4):
            if rng.random() < 0.3:
                rows.append(self._alias_example())
            else:
                text = corpus.filler_text(self.filler_rng, cfg.filler_words // 2, self.world, 0.5)
                rows.append(([self.bos, *self.ids_uncached(text)], -1, []))
        rows.sort(key=lambda row: len(row[0]))
        size = math.ceil(len(rows) / 2)
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
    device = next(model.parameters()).device
    total = 0.0
    for input_ids, attention_mask, target_index, loss_weight in parts:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        target_index, loss_weight = target_index.to(device), loss_weight.to(device)
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


def train(config: TrainConfig | None = None, out_dir: str | Path | None = None, progress: bool = True,
          device: str = "cpu"):
    """Build the world and tokenizer and train the model; returns ``(world, tokenizer, hf_model, history)``.

    Runs exactly ``config.steps`` optimiser steps (a cosine schedule after ``warmup`` linear steps) on
    ``device``. With ``out_dir`` the model is saved there as a standard HF directory (see :func:`save`).
    """
    config = config or TrainConfig()
    generator_state = torch.random.get_rng_state()
    world = build_world(config.world)
    tokenizer = build_tokenizer(world, config.tokenizer)
    try:  # the initial weights come from the global generator (HF initialises through it), restored after
        torch.manual_seed(config.seed)
        model = build_hf_model(config.model, tokenizer)
    finally:
        torch.random.set_rng_state(generator_state)
    model.to(device)
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
    for step in tqdm(range(config.lm_steps), desc="language steps", disable=not progress or not config.lm_steps):
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup)
        opt.zero_grad(set_to_none=True)
        batch_loss(model, stream.lm_batch(), 0.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    if config.frozen_blocks:
        model.model.embed_tokens.requires_grad_(False)
        for block in model.model.layers[: config.frozen_blocks]:
            block.requires_grad_(False)
    bar = tqdm(range(config.steps), desc="training factworld", disable=not progress, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(model, stream.batch(), config.target_loss_weight)
        if config.long_batch_every and step % config.long_batch_every == 0:
            batch_loss(model, stream.long_batch(), config.target_loss_weight)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        history.append({"step": step, "loss": loss})
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    model.requires_grad_(True)
    model.eval()
    model.to("cpu")
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
