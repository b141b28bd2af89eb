from __future__ import annotations

import itertools

import pytest
import torch

from keyscope._infra.errors import EmptyCorpus, KeyscopeError
from keyscope.data import corpus
from tests import hf_tiny


@pytest.fixture(scope="module")
def sp_tokenizer():
    return hf_tiny.sentencepiece_style_tokenizer()


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return hf_tiny.byte_level_bpe_tokenizer()


def test_list_file_and_folder_sources(tmp_path):
    assert list(corpus.documents(["a b", "c"])) == ["a b", "c"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "one.txt").write_text("first para\nline two\n\n\nsecond para\n", encoding="utf-8")
    (tmp_path / "sub" / "two.txt").write_text("São Paulo\n", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text\n")
    assert list(corpus.documents(tmp_path / "one.txt")) == ["first para\nline two", "second para"]
    assert list(corpus.documents(str(tmp_path))) == ["first para\nline two", "second para", "São Paulo"]


def test_corpus_ids_are_stable_and_distinct(tmp_path):
    assert corpus.corpus_id(["a", "b"]) == corpus.corpus_id(("a", "b"))
    assert corpus.corpus_id(["a", "b"]) != corpus.corpus_id(["ab"])
    assert corpus.corpus_id("factworld").startswith("factworld:seed=0:world=")  # the world its filler mentions
    assert "wikitext-103" in corpus.corpus_id("WikiText")
    (tmp_path / "x.txt").write_text("hello")
    before = corpus.corpus_id(tmp_path)
    (tmp_path / "x.txt").write_text("hello again")
    assert corpus.corpus_id(tmp_path) != before
    with pytest.raises(KeyscopeError):
        corpus.corpus_id(iter(["a"]))


def test_missing_source_is_one_line_error():
    with pytest.raises(KeyscopeError) as info:
        list(corpus.documents("/no/such/corpus"))
    assert "\n" not in str(info.value)


def test_wikitext_unavailable_is_one_line_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KeyscopeError) as info:
        next(corpus.documents("wikitext-103"))
    assert "\n" not in str(info.value) and "WikiText-103" in str(info.value)


def test_wikitext_articles_are_grouped(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [" = Valkyria = \n", " The game @-@ play is 1 @,@ 000 .\n", "", " = = Plot = = \n", " More text .\n",
            " = Tower = \n", " Tall .\n"]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"text": r} for r in rows])
    monkeypatch.setattr(corpus, "_probe_wikitext", lambda name: None)  # no hub request in a test
    docs = list(corpus.documents("wikitext"))
    assert len(docs) == 2
    assert "game-play is 1,000" in docs[0] and "= = Plot = =" in docs[0]
    assert docs[1].startswith("= Tower =")


def test_factworld_source_is_lazy_and_endless():
    pytest.importorskip("keyscope.factworld.corpus")
    docs = list(itertools.islice(corpus.documents("factworld"), 3))
    assert len(docs) == 3 and all(isinstance(d, str) and d for d in docs)


@pytest.mark.parametrize("tok_name", ["sp", "bpe"])
def test_token_batches_pack_exactly_n_tokens(request, tok_name):
    tok = request.getfixturevalue(f"{tok_name}_tokenizer")
    docs = hf_tiny.TRAINING_TEXT
    batches = list(corpus.token_batches(tok, docs, n_tokens=301, seq_len=32, batch_size=4))
    assert sum(b.n_tokens for b in batches) == 301
    bos = corpus.prepends_bos(tok)
    assert bos == (tok_name == "sp")
    for b in batches:
        assert b.input_ids.shape == b.attention_mask.shape == b.key_mask.shape
        assert b.input_ids.shape[1] == 32 and b.input_ids.shape[0] <= 4
        assert not (b.key_mask & (b.attention_mask == 0)).any(), "padding is never counted"
        if bos:
            assert (b.input_ids[:, 0] == tok.bos_token_id).all() and not b.key_mask[:, 0].any()
    # the counted tokens are the documents' tokens with EOS between documents, in order
    stream = torch.cat([b.input_ids[b.key_mask] for b in batches]).tolist()
    expected = []
    for doc in docs:
        expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert stream == expected[:301]
    # prepend_bos=True forces a BOS column in for the byte-level tokenizer too
    forced = next(corpus.token_batches(tok, docs, n_tokens=50, seq_len=16, prepend_bos=True))
    assert (forced.input_ids[:, 0] == tok.bos_token_id).all() and not forced.key_mask[:, 0].any()


def test_short_corpus_and_empty_corpus(sp_tokenizer):
    batches = list(corpus.token_batches(sp_tokenizer, ["Paris is big"], n_tokens=1000, seq_len=16))
    assert 0 < sum(b.n_tokens for b in batches) < 1000
    for empty in ([], ["", "   "]):
        with pytest.raises(EmptyCorpus):
            list(corpus.token_batches(sp_tokenizer, empty, n_tokens=10))


def test_binary_files_and_unreadable_text_are_refused(tmp_path, sp_tokenizer):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    with pytest.raises(EmptyCorpus, match="blob.txt is binary"):
        next(corpus.documents(str(binary)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème brûlée à la française, ".encode("latin-1") * 50)  # not UTF-8
    with pytest.raises(EmptyCorpus, match="is binary"):
        next(corpus.documents(str(latin1)))
    text = tmp_path / "text.txt"
    text.write_text("Paris is big. A replacement character \ufffd is text too.\n" * 20, encoding="utf-8")
    assert next(corpus.documents(str(text))).startswith("Paris is big.")
    foreign = ["Жюль Ёлка Щука Дом Чай " * 40] * 5  # the LLaMA-style tokenizer reads none of it
    with pytest.raises(EmptyCorpus, match="unknown token '<unk>'"):
        list(corpus.token_batches(sp_tokenizer, foreign, n_tokens=500, seq_len=32))
    mixed = ["Paris is big. Жюль"] * 40  # a few unknown tokens are fine
    assert sum(b.n_tokens for b in corpus.token_batches(sp_tokenizer, mixed, n_tokens=300, seq_len=32)) == 300


# ------------------------------------------------------------------------------------- long-context text


def _n(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_context_source_gives_each_context_documents_of_its_own(bpe_tokenizer):
    tok = bpe_tokenizer
    docs = ["Paris is big.", "  ", "Du Fu was a poet.", *hf_tiny.TRAINING_TEXT[:10]]
    contexts = corpus.ContextSource(docs)
    first = contexts.take(tok, 12)
    assert first.startswith("Paris is big. Du Fu was a poet."), "a short document is followed by the next, blanks skipped"
    assert _n(tok, first) >= 12 > _n(tok, first[: first.rindex(". ") + 1])
    taken = [first] + [contexts.take(tok, 12) for _ in range(3)]
    sentences = [s for text in taken for s in text.replace(". ", ".|").split("|")]
    assert sentences == [d for d in docs if d.strip()][: len(sentences)], "the corpus's order, no document twice"
    assert contexts.n_taken == 4 and contexts.n_reused == 0
    assert corpus.ContextSource.of(contexts) is contexts and corpus.ContextSource.of(None) is None


def test_context_source_keeps_the_order_of_the_stream_it_reads(bpe_tokenizer):
    """While a corpus lasts, a context is the next documents of the stream joined with spaces until they hold
    ``n + spare`` tokens — the rule the long contexts always had, so factworld's committed contexts stay the same
    (reference: that rule written out)."""
    pytest.importorskip("keyscope.factworld.corpus")
    tok = bpe_tokenizer
    stream, got = corpus.documents("factworld"), corpus.ContextSource("factworld")
    for n in (40, 300, 700, 40):
        text = ""
        for doc in stream:
            text = f"{text} {doc}" if text else doc
            if _n(tok, text) >= n + 32:
                break
        assert got.take(tok, n, spare=32) == text
    shared = corpus.documents(["a b c", "d e f", "g h i"])
    next(shared)
    assert corpus.ContextSource.of(shared).take(tok, 1) == "d e f", "an iterator is read on where it stands"


def test_context_source_goes_on_with_the_rest_of_long_documents_before_reusing_text(bpe_tokenizer):
    tok = bpe_tokenizer
    docs = [" ".join(hf_tiny.TRAINING_TEXT[i::2]) for i in (0, 1)]  # two documents of many contexts each
    contexts = corpus.ContextSource(docs)
    first, second, third = (contexts.take(tok, 30, spare=4) for _ in range(3))
    assert (first, second) == tuple(docs), "whole documents first, in the corpus's order"
    used = tok.decode(tok(first, add_special_tokens=False)["input_ids"][:34])
    assert docs[0].endswith(third) and docs[0].index(third) >= len(used), "then the rest, after what was used"
    assert third[0] != " " and docs[0][docs[0].index(third) - 1] == " ", "from the start of a word"
    with pytest.warns(UserWarning, match=r"ran out after \d+ long contexts") as caught:
        while not contexts.n_reused:
            contexts.take(tok, 30, spare=4)
        for _ in range(5):
            contexts.take(tok, 30, spare=4)
    assert len(caught) == 1, "the warning comes once"
    own = contexts.n_taken - contexts.n_reused
    assert own >= 0.8 * sum(_n(tok, d) for d in docs) / 34, "about one context per n + spare tokens of the corpus"
    assert f"after {own} long contexts" in str(caught[0].message) and contexts.n_reused == 6


def test_many_contexts_from_a_tiny_corpus_warn_once_and_count_the_reuse(bpe_tokenizer, recwarn):
    docs = ["Paris is big.", "Apple A5 runs iOS."]
    contexts = corpus.ContextSource(docs)
    texts = [contexts.take(bpe_tokenizer, 3) for _ in range(20)]
    assert texts[:2] == docs and all(text in " ".join(docs * 2) for text in texts)
    own = contexts.n_taken - contexts.n_reused
    assert contexts.n_taken == 20 and 2 <= own < 20 and texts[own] == docs[0], "then the corpus from the start"
    messages = [str(w.message) for w in recwarn.list]
    assert messages == [f"the 2 context documents given ran out after {own} long contexts with text of their own (2 "
                        f"documents, {_n(bpe_tokenizer, ' '.join(docs))} tokens): the later contexts reuse its text "
                        f"from the start (give a larger corpus for text of their own)"]
    whole = corpus.ContextSource(["Paris is big.", "Apple A5 runs iOS."])  # fewer than n + spare: all of it, every time
    assert [whole.take(bpe_tokenizer, 3, spare=100) for _ in range(2)] == ["Paris is big. Apple A5 runs iOS."] * 2


def test_a_corpus_too_small_for_one_context_is_one_line(tmp_path, bpe_tokenizer):
    small = corpus.ContextSource(["Paris is big."])
    for _ in range(2):  # the same line every time it is asked
        with pytest.raises(EmptyCorpus, match=r"only \d+ tokens of text in the 1 context documents given, fewer than "
                                              r"the 1,000 of one long context") as info:
            small.take(bpe_tokenizer, 1000)
        assert "\n" not in str(info.value)
    (tmp_path / "blank.txt").write_text("\n\n   \n", encoding="utf-8")
    for empty in ([], ["", "  "], tmp_path / "blank.txt"):
        with pytest.raises(EmptyCorpus, match="no text for long contexts in") as info:
            corpus.ContextSource(empty).take(bpe_tokenizer, 10)
        assert "\n" not in str(info.value)
    assert "blank.txt" in str(info.value)


def test_unreachable_wikitext_is_one_line_at_once_without_the_datasets_retries(monkeypatch):
    """Offline, the default corpus of a real model fails in one request, naming --corpus; datasets is never asked."""
    import sys
    import types

    from huggingface_hub import HfApi

    def unreachable(self, name, timeout=None):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    fake = types.SimpleNamespace(load_dataset=lambda *a, **k: pytest.fail("datasets was asked"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(KeyscopeError) as info:
        next(corpus.documents("wikitext-103"))
    assert "--corpus" in str(info.value) and "\n" not in str(info.value)
