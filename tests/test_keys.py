from __future__ import annotations

import unicodedata

import pytest
import torch

from keyscope.errors import LayerOutOfRange, SubjectNotFound
from keyscope.keys import (
    collect_keys,
    encode,
    fill,
    layer_keys,
    locate,
    pad_batch,
    subject_last_index,
    unknown_pieces,
    unknown_subject_pieces,
    unknown_token_message,
)
from keyscope.models import down_projection, key_hook, load_model, value_hook
from tests import hf_tiny

LAYER = 1


@pytest.fixture(scope="module")
def tokenizers():
    return {"bpe": hf_tiny.byte_level_bpe_tokenizer(), "sp": hf_tiny.sentencepiece_style_tokenizer()}


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {arch: load_model(str(path)) for arch, path in tiny_checkpoints.items()}


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


def test_bridge_tokenizer_prepends_bos_and_index_counts_it(models):
    model = models["gpt2"]
    enc, index = locate(model.tokenizer, "{} is located in", "The Eiffel Tower")
    assert enc.ids[0] == model.tokenizer.bos_token_id
    assert torch.equal(model.to_tokens(enc.text)[0], torch.tensor(enc.ids))


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


# ------------------------------------------------------------------------------------- collect_keys

PROMPTS = ["{} is located in the city of", "The capital of France is {}, they say", "{}", "I flew to {} last year"]
SUBJECTS = ["The Eiffel Tower", "Paris", "São Paulo", "Los Angeles"]


@pytest.mark.parametrize("arch", hf_tiny.ARCHITECTURES)
def test_keys_match_run_with_cache_and_raw_pre_hook(models, arch):
    model = models[arch]
    keys = collect_keys(model, PROMPTS, SUBJECTS, LAYER)
    assert keys.shape == (len(PROMPTS), model.cfg.d_mlp) and keys.dtype == torch.float32

    captured: list[torch.Tensor] = []
    handle = down_projection(model, LAYER).register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    try:
        for row, (prompt, subject) in enumerate(zip(PROMPTS, SUBJECTS)):
            enc, index = locate(model.tokenizer, prompt, subject)
            ids = torch.tensor([enc.ids])
            _, cache = model.run_with_cache(ids, names_filter=key_hook(LAYER))
            torch.testing.assert_close(keys[row], cache[key_hook(LAYER)][0, index], rtol=1e-5, atol=1e-5)
            captured.clear()
            with torch.no_grad():
                model(ids)
            torch.testing.assert_close(keys[row], captured[0][0, index], rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", hf_tiny.ARCHITECTURES)
def test_left_and_right_padding_give_the_same_keys(models, arch):
    model = models[arch]
    right = collect_keys(model, PROMPTS, SUBJECTS, LAYER, padding_side="right")
    left = collect_keys(model, PROMPTS, SUBJECTS, LAYER, padding_side="left")
    single = collect_keys(model, PROMPTS, SUBJECTS, LAYER, batch_size=1)
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, right, rtol=1e-5, atol=1e-5)

    # the check has teeth: the batch really is padded, and left padding without the mask changes the keys
    seqs = [locate(model.tokenizer, p, s)[0].ids for p, s in zip(PROMPTS, SUBJECTS)]
    ids, mask = pad_batch(seqs, model.tokenizer.pad_token_id, "left")
    assert (mask == 0).any()
    naive = layer_keys(model, ids, None, LAYER)[:, -1]  # (batch, d_mlp) at each row's last real token
    masked = layer_keys(model, ids, mask, LAYER)[:, -1]
    short = [i for i, seq in enumerate(seqs) if len(seq) < ids.shape[1]]
    assert not torch.allclose(naive[short], masked[short], atol=1e-4)


def test_forward_stops_at_the_key(models):
    model = models["llama"]
    fired: list[str] = []
    later = [value_hook(LAYER), key_hook(LAYER + 1), f"blocks.{LAYER + 1}.hook_in"]
    for name in later:
        model.add_hook(name, lambda act, hook: fired.append(hook.name))
    try:
        ids, mask = pad_batch([locate(model.tokenizer, "{} is", "Paris")[0].ids], 0)
        keys = layer_keys(model, ids, mask, LAYER)
        assert keys.shape[-1] == model.cfg.d_mlp
        collect_keys(model, ["{} is"], ["Paris"], LAYER)
        assert fired == []
        with torch.no_grad():
            model(ids)
        assert len(fired) == len(later), "the hooks themselves work"
    finally:
        model.reset_hooks()


def test_last_layer_and_bad_layers(models):
    model = models["gpt2"]
    last = model.cfg.n_layers - 1
    keys = collect_keys(model, ["{} is"], ["Paris"], last)
    enc, index = locate(model.tokenizer, "{} is", "Paris")
    _, cache = model.run_with_cache(torch.tensor([enc.ids]), names_filter=key_hook(last))
    torch.testing.assert_close(keys[0], cache[key_hook(last)][0, index], rtol=1e-5, atol=1e-5)
    for bad in (-1, model.cfg.n_layers):
        with pytest.raises(LayerOutOfRange):
            collect_keys(model, ["{} is"], ["Paris"], bad)
    with pytest.raises(ValueError):
        collect_keys(model, ["{} is"], ["Paris", "Rome"], 0)
    with pytest.raises(SubjectNotFound):
        collect_keys(model, ["Rome is big"], ["Paris"], 0)


def test_length_batches_cover_every_index_once_and_respect_both_limits():
    from keyscope.keys import length_batches

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


def test_unknown_pieces_name_the_text_the_tokenizer_cannot_read():
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
