from __future__ import annotations

import pytest

from keyscope._infra.errors import EmptyCorpus
from keyscope.data import corpus
from tests import hf_tiny

WIKIEXTRACTOR = """<doc id="56564557" url="?curid=56564557" title="Marcus Claudius Tacitus">
Marcus Claudius Tacitus


</doc>
<doc id="56564559" url="?curid=56564559" title="Jarred Shaw">
Jarred Shaw

Jarred Shaw (born September 28, 1990) is an American basketball player.
Professional career.
On October 31, 2015, Shaw was selected by the Santa Cruz Warriors.

</doc>
<doc id="1" url="?curid=1" title="São Paulo">
São Paulo

São Paulo is a city in Brazil.
</doc>
"""

#: WikiText lines end in " \n" and blank lines are a single space, as in the released files.
WIKITEXT_TOKENS = "".join(
    f" {line} \n" if line else " \n"
    for line in [
        "",
        "= Robert Boulter =",
        "",
        "Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role .",
        "",
        "= = Career = =",
        "",
        "In 2006 , Boulter earned 1 @,@ 000 pounds and 2 @.@ 5 stars .",
        "",
        "= Du Fu =",
        "",
        "Du Fu was a prominent Chinese poet .",
    ]
)


def test_format_sniffing(tmp_path):
    (tmp_path / "wiki_00").write_text(WIKIEXTRACTOR, encoding="utf-8")
    (tmp_path / "w.tokens").write_text(WIKITEXT_TOKENS, encoding="utf-8")
    (tmp_path / "plain.txt").write_text("\n\nJust text.\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    assert corpus.file_format(tmp_path / "wiki_00") == "wikiextractor"
    assert corpus.file_format(tmp_path / "w.tokens") == "wikitext"
    assert corpus.file_format(tmp_path / "plain.txt") == "text"
    assert corpus.file_format(tmp_path / "empty.txt") == "text"


def test_wikiextractor_strips_tags_and_skips_stubs(tmp_path):
    path = tmp_path / "enwiki.txt"
    path.write_text(WIKIEXTRACTOR, encoding="utf-8")
    docs = list(corpus.documents(path))
    assert len(docs) == 2, "the title-only stub is skipped"
    assert docs[0].startswith("Jarred Shaw (born") and "Professional career." in docs[0]
    assert docs[1] == "São Paulo is a city in Brazil."
    assert not any("<doc" in d or "</doc>" in d for d in docs)


def test_wikitext_articles_and_escapes(tmp_path):
    path = tmp_path / "wiki.test.tokens"
    path.write_text(WIKITEXT_TOKENS, encoding="utf-8")
    docs = list(corpus.documents(path))
    assert len(docs) == 2
    assert docs[0].startswith("= Robert Boulter =") and "guest-starring" in docs[0]
    assert "1,000 pounds and 2.5 stars" in docs[0] and "@" not in docs[0]
    assert "= = Career = =" in docs[0], "section headings are kept as text, as in the WikiText-103 stream"
    assert docs[1] == "= Du Fu =\nDu Fu was a prominent Chinese poet ."


def test_wikitext_raw_with_crlf(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = Robert Boulter = \r\n Robert Boulter is an actor @-@ writer . \r\n = Du Fu = \r\n Poet . \r\n")
    docs = list(corpus.documents(path))
    assert docs == ["= Robert Boulter =\nRobert Boulter is an actor-writer .", "= Du Fu =\nPoet ."]
    assert not any("\r" in d for d in docs)


def test_plain_text_folder_with_mixed_formats(tmp_path):
    (tmp_path / "AA").mkdir()
    (tmp_path / "AA" / "wiki_00").write_text(WIKIEXTRACTOR, encoding="utf-8")
    (tmp_path / "b.txt").write_text("para one\nline\n\npara two\n", encoding="utf-8")
    (tmp_path / "c.tokens").write_text(WIKITEXT_TOKENS, encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    docs = list(corpus.documents(tmp_path))
    assert len(docs) == 2 + 2 + 2  # sorted: AA/wiki_00, b.txt, c.tokens
    assert docs[2:4] == ["para one\nline", "para two"]
    assert "ignored" not in "".join(docs)
    first = corpus.corpus_id(tmp_path)
    (tmp_path / "AA" / "wiki_00").write_text(WIKIEXTRACTOR + "\n", encoding="utf-8")
    assert corpus.corpus_id(tmp_path) != first, "extension-less WikiExtractor files count in the corpus id"


def test_new_formats_feed_token_batches(tmp_path):
    path = tmp_path / "enwiki.txt"
    path.write_text(WIKIEXTRACTOR, encoding="utf-8")
    tok = hf_tiny.byte_level_bpe_tokenizer()
    batches = list(corpus.token_batches(tok, path, n_tokens=40, seq_len=16, batch_size=2))
    assert sum(b.n_tokens for b in batches) == 40


def test_wikiextractor_skips_redirects_and_magic_words(tmp_path):
    path = tmp_path / "wiki_01"
    path.write_text('<doc id="2" url="?curid=2" title="Mid Coast">\nMid Coast\n\n #REDIRECT Mid_Coast\n</doc>\n'
                    '<doc id="3" url="?curid=3" title="Seo">\nSeo\n#REDIRECTSeo Hyun-deok\n</doc>\n'
                    '<doc id="4" url="?curid=4" title="Tacitus">\nTacitus\n__NOEDITSECTION__\n</doc>\n'
                    '<doc id="5" url="?curid=5" title="Du Fu">\nDu Fu\n__NOTOC__\nDu Fu was a poet.\n</doc>\n',
                    encoding="utf-8")
    assert list(corpus.documents(path)) == ["Du Fu was a poet."]


#: WikiText-2-raw as exported from the hub: CRLF line ends, blank lines dropped, escapes and headings kept.
WIKITEXT_RAW = (" = Robert Boulter = \r\n Robert Boulter is an English film , television and theatre actor . \r\n"
                " = = Career = = \r\n In 2000 Boulter had a guest @-@ starring role on The Bill . \r\n"
                " = Du Fu = \r\n Du Fu was a prominent Chinese poet of the Tang dynasty . \r\n")

#: One corpus of each format a user can pass, as ``{name: (relative path, bytes)}``; each holds two documents.
FORMATS = {
    "wikitext-tokens": ("wiki.test.tokens", WIKITEXT_TOKENS.encode()),
    "wikitext-raw": ("wiki.test.raw", WIKITEXT_RAW.encode()),
    "wikiextractor": ("text/AA/wiki_00", WIKIEXTRACTOR.encode()),
    "plain-text": ("notes.txt", b"Paris is the capital of France.\nIt is big.\n\n\nSlovenia is a country.\n"),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_gives_documents_for_c_scans_and_long_contexts(tmp_path, name):
    """WikiText (tokenised and raw), WikiExtractor folders and plain text all give their documents to
    ``C`` and corpus scans (:func:`keyscope.data.corpus.token_batches`) and to long contexts
    (:class:`keyscope.data.corpus.ContextSource`), and a corpus too small for a context is one line."""
    relative, data = FORMATS[name]
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    source = tmp_path if name == "wikiextractor" else path  # WikiExtractor's output is a folder
    docs = list(corpus.documents(source))
    assert len(docs) == 2 and all(d.strip() and "\r" not in d and "@-@" not in d and "<doc" not in d for d in docs)
    tok = hf_tiny.byte_level_bpe_tokenizer()
    n_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)  # + EOS after each
    batches = list(corpus.token_batches(tok, source, n_tokens=10 * n_tokens, seq_len=16, batch_size=2))
    assert sum(b.n_tokens for b in batches) == n_tokens, "the whole corpus, and no more"
    contexts = corpus.ContextSource(source)
    assert contexts.take(tok, 5) == docs[0] and contexts.take(tok, 5).startswith(docs[1])
    with pytest.raises(EmptyCorpus, match=f"tokens of text in the corpus {source}, fewer than the 10,000 of one"):
        corpus.ContextSource(source).take(tok, 10_000)
