"""factworld's word-level tokenizer (Hugging Face ``tokenizers``).

Every whitespace-separated word of the world (names, aliases, templates, targets, filler) is one token, so
a subject of three words is three tokens and a shuffle of its tokens decodes back to plain text by joining
with spaces. A ``<bos>`` token starts every sequence, as in LLaMA.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from keyscope.factworld import corpus
from keyscope.factworld.world import World

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A word-level tokenizer covering every word ``world`` and its filler can produce."""
    words = sorted(world.name_words() | world.template_words() | corpus.vocabulary())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    bos = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=1024,
    )
