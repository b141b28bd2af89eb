"""Tiny random Hugging Face checkpoints, built and saved locally by the tests.

No machine running the tests can download weights, so every real-model code path is exercised on
checkpoints made here: the same ``config.json`` + ``model.safetensors`` + tokenizer files a hub download
would give, loaded through the same ``from_pretrained`` path. Each architecture keeps its real module
layout (GPT-2 ``Conv1D``, LLaMA/Mistral gated ``Linear`` MLPs, GPT-NeoX fused attention, GPT-J
parallel attention and MLP with partial rotary embeddings).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ARCHITECTURES = ("gpt2", "llama", "mistral", "gpt_neox", "gptj")

TRAINING_TEXT = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Michael Jordan played basketball for the Chicago Bulls.",
    "Kobe Bryant played for the Los Angeles Lakers.",
    "The Republic of Slovenia is a country in Central Europe.",
    "Danielle Darrieux was a French actress whose mother tongue was French.",
    "Toko Yasuda plays the guitar and speaks English and Japanese.",
    "Autonomous University of Madrid, which is located in Spain.",
    "Ljubljana is the capital city of Slovenia; it has 300,000 inhabitants.",
    "Café Müller, Zürich and São Paulo are written with accents – naïve façade.",
    "Apple A5 was created by Apple. Apple A5 runs iOS.",
] * 4


def word_level_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with a BOS post-processor (like factworld's)."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for text in words or TRAINING_TEXT:
        for w in text.split():
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def byte_level_bpe_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (``Ġ`` marks a leading space, no BOS added by default)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def sentencepiece_style_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A LLaMA-style tokenizer: ``▁`` metaspace pieces, BPE, and a ``<s>`` BOS on every sequence."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def _config(arch: str, vocab_size: int, *, n_layers: int, d_model: int, d_mlp: int, n_heads: int):
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=512, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
            n_inner=d_mlp, bos_token_id=0, eos_token_id=0,
        )
    if arch in ("llama", "mistral"):
        cls = LlamaConfig if arch == "llama" else MistralConfig
        extra = {"sliding_window": 256} if arch == "mistral" else {}
        return cls(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_heads // 2 if arch == "mistral" else n_heads,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, max_position_embeddings=512, rotary_pct=0.25, bos_token_id=0,
            eos_token_id=0,
        )
    if arch == "gptj":
        return GPTJConfig(
            vocab_size=vocab_size, n_positions=512, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
            n_inner=d_mlp, rotary_dim=(d_model // n_heads) // 2, bos_token_id=0, eos_token_id=0,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")


def save_tiny_checkpoint(
    arch: str,
    path: str | Path,
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    n_layers: int = 3,
    d_model: int = 64,
    d_mlp: int = 128,
    n_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a random ``arch`` checkpoint with ``tokenizer`` as a standard HF directory at ``path``."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if tokenizer is None:
        tokenizer = byte_level_bpe_tokenizer() if arch in ("gpt2", "gpt_neox", "gptj") else sentencepiece_style_tokenizer()
    config = _config(arch, len(tokenizer), n_layers=n_layers, d_model=d_model, d_mlp=d_mlp, n_heads=n_heads)
    with torch.random.fork_rng(devices=[]):  # HF initialises from the global generator: restored on exit
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # random init of HF is small; widen it so hooks carry visible signal
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
