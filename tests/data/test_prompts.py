"""Prompt helpers: filling templates, locating the subject's last token, padding and batching."""

from __future__ import annotations

import unicodedata

import pytest

from keyscope._infra.errors import SubjectNotFound
from keyscope.data.prompts import encode, fill, length_batches, locate, subject_last_index
from tests import hf_tiny


@pytest.fixture(scope="module")
def tokenizers():
    return {"bpe": hf_tiny.byte_level_bpe_tokenizer(), "sp": hf_tiny.sentencepiece_style_tokenizer()}


# ------------------------------------------------------------------------------------- subject_last_index

# (prompt template, subject): subject at the start, in the middle, at the end, unicode, repeated words.
TRICKY = [
    ("{} is located in Paris", "The Eiffel Tower"),
    ("The tallest building near {} is old", "The Eiffel Tower"),
    ("Michael Jordan played for {}", "the Chicago Bulls"),
    ("{} is a café in Germany", "Café Müller"),
    ("The plane flew from Zürich to {}", "São Paulo"),
    ("{} was created by Apple", "Apple A5"),
    ("Kobe Bryant played for the {} in the west", "Los Angeles Lakers"),
]


@pytest.mark.parametrize("tok_name", ["bpe", "sp"])
@pytest.mark.parametrize("template,subject", TRICKY)
def test_subject_last_index_ends_on_the_subject(tokenizers, tok_name, template, subject):
    tok = tokenizers[tok_name]
    span = fill(template, subject)
    enc, index = locate(tok, template, subject)
    assert index == subject_last_index(tok, template, subject)
    s, e = enc.offsets[index]
    assert s < span.end <= e, "the chosen token holds the subject's last character"
    # every later non-special token starts at or after the subject's end
    assert all(o[0] >= span.end for o, sp in zip(enc.offsets[index + 1 :], enc.special[index + 1 :]) if not sp)
    # decoding everything up to the index gives back the text up to the end of the subject
    ids = [i for i, sp in zip(enc.ids[: index + 1], enc.special[: index + 1]) if not sp]
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == span.text[: span.end]
    # a filled prompt with a single occurrence gives the same index as the template
    assert subject_last_index(tok, span.text, subject) == index


def test_bos_convention(tokenizers):
    sp, bpe = tokenizers["sp"], tokenizers["bpe"]
    # the SentencePiece-style tokenizer prepends <s>: indices count it
    enc, index = locate(sp, "{} is in", "São Paulo")
    assert enc.ids[0] == sp.bos_token_id and enc.special[0]
    assert subject_last_index(sp, "{} is in", "São Paulo", prepend_bos=False) == index - 1
    # the raw byte-level tokenizer adds nothing; prepend_bos=True shifts by one
    enc_b, index_b = locate(bpe, "{} is in", "São Paulo")
    assert not any(enc_b.special)
    assert subject_last_index(bpe, "{} is in", "São Paulo", prepend_bos=True) == index_b + 1
    assert encode(bpe, "São Paulo", prepend_bos=True).ids[0] == bpe.bos_token_id


@pytest.mark.parametrize("tok_name", ["bpe", "sp"])
def test_repeated_subject_uses_the_slot(tokenizers, tok_name):
    tok = tokenizers[tok_name]
    first = subject_last_index(tok, "{} is not Paris", "Paris")
    second = subject_last_index(tok, "Paris is not {}", "Paris")
    filled = subject_last_index(tok, "Paris is not Paris", "Paris")  # filled prompt: first occurrence
    assert first == filled < second
    # every {} is filled, the first slot is used
    assert subject_last_index(tok, "{} and {}", "Apple") == subject_last_index(tok, "Apple and Apple", "Apple")


@pytest.mark.parametrize("tok_name", ["bpe", "sp"])
def test_subject_at_very_start_and_end(tokenizers, tok_name):
    tok = tokenizers[tok_name]
    enc, index = locate(tok, "I flew to {}", "São Paulo")
    assert index == len(enc) - 1
    enc, index = locate(tok, "{}", "Café Müller")
    assert index == len(enc) - 1
    first_real = next(i for i, sp in enumerate(enc.special) if not sp)
    assert enc.offsets[first_real][0] == 0


def test_unicode_normalisation_of_filled_prompt(tokenizers):
    tok = tokenizers["bpe"]
    decomposed = unicodedata.normalize("NFD", "I met Café Müller today")
    index = subject_last_index(tok, decomposed, "Café Müller")
    assert index == subject_last_index(tok, "I met {} today", "Café Müller")


@pytest.mark.parametrize("tok_name", ["bpe", "sp"])
def test_subject_absent_raises_one_line(tokenizers, tok_name):
    with pytest.raises(SubjectNotFound) as info:
        subject_last_index(tokenizers[tok_name], "The Eiffel Tower is in Paris", "Big Ben")
    assert "\n" not in str(info.value) and "Big Ben" in str(info.value)
    with pytest.raises(SubjectNotFound):
        subject_last_index(tokenizers[tok_name], "{} is in Paris", "  ")


def test_subject_not_on_token_boundary_takes_the_covering_token(tokenizers):
    tok = tokenizers["sp"]
    enc, index = locate(tok, "The city of Paris, they say", "Paris")
    s, e = enc.offsets[index]
    assert s < fill("The city of Paris, they say", "Paris").end <= e


def test_length_batches_cover_every_index_once_and_respect_both_limits():
    lengths = [5, 300, 7, 6, 310, 5, 8, 9, 12, 300]
    batches = length_batches(lengths, batch_size=3, max_tokens=700)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in batches)
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 700 for b in batches)
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)  # shortest first
    assert not any(lengths[i] > 100 for i in batches[0])  # a long context never pads the short prompts
    with pytest.raises(ValueError):
        length_batches(lengths, 0)


@pytest.mark.parametrize(
    "prompt,subject,template,written",
    [
        ("BBC One, by", "BBC One", "{}, by", "BBC One"),
        ("Where is the Eiffel Tower?", "The Eiffel Tower", "Where is {}?", "the Eiffel Tower"),  # case
        ("São Paulo is in", "São Paulo", "{} is in", "São Paulo"),  # NFD vs NFC below
        ("Cafe\u0301 Müller opened in", "Caf\u00e9 Müller", "{} opened in", "Caf\u00e9 Müller"),
        ("DANIELLE DARRIEUX’S mother tongue is", "Danielle Darrieux", "{}’S mother tongue is", "DANIELLE DARRIEUX"),
        ("Toko  Yasuda plays", "Toko Yasuda", "{} plays", "Toko  Yasuda"),  # whitespace run
        ("O’Neill and Paris", "O'Neill", "{} and Paris", "O’Neill"),  # apostrophe style
        ("Paris and Paris", "Paris", "{} and Paris", "Paris"),  # first occurrence
        ("{} already", "X", "{} already", "X"),
    ],
)
def test_lenient_fill_gives_the_template_and_the_subject_as_written(prompt, subject, template, written):
    span = fill(prompt, subject, lenient=True)
    got_template, got_written = span.template, span.subject
    assert (got_template, got_written) == (template, written)
    if "{}" not in prompt:  # the template filled with the subject as written gives back the (NFC) prompt
        assert fill(got_template, got_written).text == unicodedata.normalize("NFC", prompt)


def test_lenient_fill_still_raises_for_an_absent_subject():
    with pytest.raises(SubjectNotFound):
        fill("BBC One, by", "ITV", lenient=True)
    with pytest.raises(SubjectNotFound):
        fill("where is the eiffel tower", "The Eiffel Tower")  # strict by default


def test_unknown_pieces_name_the_text_the_tokenizer_cannot_read():
    from keyscope.data.prompts import unknown_pieces, unknown_subject_pieces, unknown_token_message

    sp = hf_tiny.sentencepiece_style_tokenizer()  # no byte fallback: Cyrillic letters are <unk>, one per letter
    encoded = encode(sp, "Жюль Paris lives in Ёлка")
    assert unknown_pieces(sp, encoded) == ["Жюль", "Ёлка"]  # adjacent <unk> letters joined into words
    assert unknown_pieces(sp, encoded, 0, 10) == ["Жюль"]
    assert unknown_subject_pieces(sp, "{} lives in Paris", "Жюль Paris") == ["Жюль"]
    assert unknown_subject_pieces(sp, "{} lives in Ёлка", "The Eiffel Tower") == []  # only the subject counts
    bpe = hf_tiny.byte_level_bpe_tokenizer()  # byte-level: every text has tokens, none unknown
    assert unknown_pieces(bpe, encode(bpe, "Жюль Paris")) == []
    assert "'Жюль'" in unknown_token_message(sp, ["Жюль"], "the subject") and "'<unk>'" in unknown_token_message(
        sp, ["Жюль"], "the subject")
