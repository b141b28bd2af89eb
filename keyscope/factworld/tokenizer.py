"""factworld's tokenizers (Hugging Face ``tokenizers``): a byte-level BPE (the default) or word-level.

**Byte-level BPE** (``TokenizerConfig(kind="bpe")``, factworld v4), as GPT-2 and LLaMA use: bytes mapped to
printable characters, a space glued to the front of each word (``Ġ``; ``add_prefix_space`` makes the first word
of a text look like every other, as SentencePiece's ``▁`` does), and merges learned by keyscope from a training
text of the world. The training text is built so that the world's made-up names come out in **subword pieces**,
as rare names do in a pretrained LM's vocabulary: it holds the filler prose (many times over), the relations'
templates and targets, the alias decorations and statements, and each distinct name word **once** — so merges
are spent on ordinary words, which become single tokens, and a name word is cut into the pieces its letters
share with the other name words (``keyscope factworld info`` reports how many tokens a name takes). Nothing
is unknown to a byte-level tokenizer.

**Word-level** (``kind="word"``, factworld v1–v3): every whitespace-separated word is one token.

Both start every sequence with a ``<bos>`` token, as LLaMA does. Training is deterministic: the same world and
config give the same vocabulary and merges.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from keyscope._infra.errors import KeyscopeError
from keyscope.factworld import corpus
from keyscope.factworld.world import (
    ALIAS_STATEMENTS,
    DESCRIPTORS,
    PLACES,
    PREFIXES,
    SUFFIXES,
    TITLES,
    World,
)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
KINDS = ("bpe", "word")


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer a factworld model reads with. No I/O.

    ``vocab_size`` (BPE only) counts the 256 byte symbols and the special tokens; ``filler_words`` is how much
    filler prose the BPE is trained on.
    """

    kind: str = "bpe"
    vocab_size: int = 1600
    filler_words: int = 400_000
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"tokenizer kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == "bpe" and self.vocab_size < 300:
            raise ValueError(f"a byte-level BPE needs vocab_size >= 300 (256 bytes + merges), not {self.vocab_size}")


def _fast(tok: Tokenizer, bos: int) -> PreTrainedTokenizerFast:
    tok.post_processor = processors.Sequence([
        *([processors.ByteLevel(trim_offsets=True)] if isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel) else []),
        processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=1024,
    )


def name_words(world: World) -> list[str]:
    """The distinct words of subject names and aliases that are not ordinary words of the world, sorted."""
    return sorted(world.name_words() - world.template_words() - corpus.vocabulary() - _decoration_words())


def _decoration_words() -> set[str]:
    return {w for group in (TITLES, PREFIXES, SUFFIXES, DESCRIPTORS, PLACES) for phrase in group for w in phrase.split()}


def bpe_training_texts(world: World, config: TokenizerConfig):
    """The texts the BPE is trained on (module docstring), in a fixed order: filler prose, every relation
    template with every target, alias decorations and statements, then every name word once."""
    rng = random.Random(f"tokenizer-{config.seed}")
    remaining = config.filler_words
    while remaining > 0:
        text = corpus.filler_text(rng, min(400, remaining))
        remaining -= len(text.split())
        yield text
    for relation in world.relations:
        for template in relation.templates:
            for target in relation.targets:
                yield f"{template.format('X')} {target} ."
    for group in (TITLES, PREFIXES, SUFFIXES, DESCRIPTORS, PLACES):
        for phrase in group:
            yield f"{phrase} X ; X {phrase}"
    for statement in ALIAS_STATEMENTS:
        yield statement.format(name="X", alias="Y")
    yield " ".join(name_words(world))


def _build_bpe(world: World, config: TokenizerConfig) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bpe_training_texts(world, config), trainer)
    return _fast(tok, tok.token_to_id("<bos>"))


def _build_word_level(world: World) -> PreTrainedTokenizerFast:
    words = sorted(world.name_words() | world.template_words() | corpus.vocabulary())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return _fast(tok, vocab["<bos>"])


def build_tokenizer(world: World, config: TokenizerConfig | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer of ``config`` (default: the byte-level BPE) for ``world``."""
    config = config or TokenizerConfig()
    tokenizer = _build_bpe(world, config) if config.kind == "bpe" else _build_word_level(world)
    targets = sorted({target for relation in world.relations for target in relation.targets})
    split = [t for t in targets if len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise KeyscopeError(f"the tokenizer (vocab_size {config.vocab_size}) cuts {len(split)} of the {len(targets)} "
                            f"targets into several tokens (e.g. {split[0]!r}); factworld's targets must be single "
                            f"tokens: raise TokenizerConfig.vocab_size")
    return tokenizer
