"""Text corpora: where the documents behind ``C = E[k kᵀ]``, long contexts and corpus scans come from.

A corpus *source* is one of

* a list/tuple of strings — the documents themselves;
* a path to a text file, or to a folder (every corpus file below it, in sorted order: ``*.txt``, WikiText's
  ``*.tokens``/``*.raw`` and WikiExtractor's extension-less ``wiki_NN`` files). Each file's format is sniffed
  from its first non-blank line (:func:`file_format`):

  - ``wikiextractor`` (first line ``<doc id=… title=…>``): one document per ``<doc>`` block, tags stripped,
    the repeated title line and magic words (``__NOTOC__``) dropped, empty stubs (title only) and redirects
    skipped;
  - ``wikitext`` (first line `` = Title = ``, the WikiText ``.tokens`` and ``.raw`` files): one document per
    article, split at the top-level `` = Title = `` lines, with the number escapes ``@-@``, ``@,@``, ``@.@``
    undone — exactly the preprocessing of the ``"wikitext-103"`` stream below, so a local WikiText-2 file and
    the streamed WikiText-103 give comparable text. Section headings (`` = = History = = ``) and ``<unk>``
    are kept as text, as in that stream; CRLF line ends are accepted;
  - ``text`` (anything else): read line by line and split into documents at blank lines;
* ``"wikitext-103"`` (alias ``"wikitext"``) — WikiText-103 (``Salesforce/wikitext``,
  ``wikitext-103-raw-v1``, train split) streamed through the ``datasets`` library, one document per
  article; the default for real models, as in the paper (Yan et al., "Keys to Robust Edits");
* ``"factworld"`` — the endless seeded filler stream of :func:`keyscope.factworld.corpus.filler_documents`.

:func:`documents` yields the documents; :func:`corpus_id` names a source for cache keys;
:func:`token_batches` packs documents into fixed-length token windows with a bound on the number of tokens
(the streaming input of :mod:`keyscope.analysis.covariance` and of corpus scans); a :class:`ContextSource` hands the
long contexts of a run (:func:`keyscope.data.perturbations.long_context`) text of their own, context after context.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from keyscope._infra.errors import EmptyCorpus, KeyscopeError
from keyscope.data.prompts import encode

FACTWORLD = "factworld"
WIKITEXT = "wikitext-103"
WIKITEXT_DATASET = ("Salesforce/wikitext", "wikitext-103-raw-v1", "train")
_ALIASES = {"wikitext": WIKITEXT, "wikitext103": WIKITEXT, "wikitext-103": WIKITEXT, FACTWORLD: FACTWORLD}

Source = str | Path | Sequence[str]


def default_corpus(model) -> str:
    """``"factworld"`` for a factworld model (the shipped one or one rebuilt with ``keyscope factworld train``,
    known by its card), WikiText-103 for every other model (as in the paper)."""
    from keyscope.model.models import model_card, model_name

    is_factworld = model_name(model) == FACTWORLD or model_card(model).get("name") == FACTWORLD
    return FACTWORLD if is_factworld else WIKITEXT


def _named(source: Source) -> str | None:
    if isinstance(source, str):
        return _ALIASES.get(source.lower())
    return None


#: Files a corpus folder contributes: plain text, WikiText token/raw files, WikiExtractor's ``wiki_00``…
_CORPUS_SUFFIXES = (".txt", ".tokens", ".raw")
_WIKIEXTRACTOR_NAME = re.compile(r"^wiki_\d+$")


def _is_corpus_file(path: Path) -> bool:
    return path.is_file() and (path.suffix in _CORPUS_SUFFIXES or bool(_WIKIEXTRACTOR_NAME.match(path.name)))


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if _is_corpus_file(p))


def _resolve_path(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise KeyscopeError(
            f"corpus {str(source)!r} is neither a file, a folder, 'wikitext-103' nor 'factworld'; "
            f"pass a list of strings for literal documents"
        )
    return path


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")
_WIKITEXT_DETOKENIZE = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_DOC_OPEN = re.compile(r'^<doc(?:\s[^>]*)?>$')
_DOC_TITLE = re.compile(r'\btitle="([^"]*)"')
_MAGIC_WORD = re.compile(r"^__[A-Z]+__$")
_REDIRECT = re.compile(r"^#redirect", re.IGNORECASE)

WIKIEXTRACTOR = "wikiextractor"
WIKITEXT_FILE = "wikitext"
PLAIN_TEXT = "text"


def _lines(file: Path) -> Iterator[str]:
    """The lines of ``file`` without their line ends (``\n`` or ``\r\n``), decoding errors replaced."""
    with open(file, encoding="utf-8", errors="replace", newline="") as handle:
        for line in handle:
            yield line.rstrip("\r\n")


def file_format(file: str | Path) -> str:
    """The format of a corpus file, sniffed from its first non-blank line.

    ``"wikiextractor"`` if it is a ``<doc …>`` tag, ``"wikitext"`` if it is a top-level WikiText heading
    (`` = Title = ``), else ``"text"``.
    """
    for line in _lines(Path(file)):
        if not line.strip():
            continue
        if _DOC_OPEN.match(line.strip()):
            return WIKIEXTRACTOR
        if _WIKITEXT_TITLE.match(line):
            return WIKITEXT_FILE
        return PLAIN_TEXT
    return PLAIN_TEXT


def _paragraph_documents(lines: Iterable[str]) -> Iterator[str]:
    """Plain text: documents are the runs of non-blank lines between blank lines."""
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _wikiextractor_documents(lines: Iterable[str]) -> Iterator[str]:
    """WikiExtractor output: the body of each ``<doc …>…</doc>`` block, without the title line it repeats.

    Blank lines and magic-word lines (``__NOTOC__``) inside a block are dropped; a block with no text after its
    title (a stub) or whose text is a redirect (``#REDIRECT …``) is skipped.
    """
    title: str | None = None
    body: list[str] | None = None
    for line in lines:
        stripped = line.strip()
        if body is None:
            if _DOC_OPEN.match(stripped):
                match = _DOC_TITLE.search(stripped)
                title, body = (match.group(1) if match else None), []
            continue
        if stripped == "</doc>":
            yield from _wikiextractor_body(title, body)
            title, body = None, None
        elif stripped and not _MAGIC_WORD.match(stripped):
            body.append(line)
    if body:  # a truncated last block
        yield from _wikiextractor_body(title, body)


def _wikiextractor_body(title: str | None, body: list[str]) -> Iterator[str]:
    """The text of one WikiExtractor block (its lines after ``<doc>``), if it has any besides the title."""
    if body and title is not None and body[0].strip() == title.strip():
        body = body[1:]
    if body and not _REDIRECT.match(body[0].strip()):
        yield "\n".join(body)


def _wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """WikiText lines grouped into articles at the top-level `` = Title = `` lines, escapes undone.

    Blank lines are dropped and every kept line is stripped; headings stay as text.
    """
    article: list[str] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line) and article:
            yield _detokenize("\n".join(article))
            article = []
        if line.strip():
            article.append(line.strip())
    if article:
        yield _detokenize("\n".join(article))


_READERS = {WIKIEXTRACTOR: _wikiextractor_documents, WIKITEXT_FILE: _wikitext_articles, PLAIN_TEXT: _paragraph_documents}


#: Bytes of a corpus file sniffed for binary content, and the share of undecodable characters that makes it binary.
_SNIFF_BYTES = 1 << 14
_MAX_UNDECODABLE = 0.05


def check_text_file(file: str | Path) -> None:
    """Raise :class:`EmptyCorpus` (naming the file) when the start of ``file`` is not text: it holds NUL bytes
    or more than 5% of its characters are not UTF-8 (a binary file would otherwise be read as replacement
    characters and fill ``C`` with the keys of a few junk tokens)."""
    with open(file, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - head.decode("utf-8", errors="ignore").count("\ufffd")
    if b"\0" in head or (text and bad > _MAX_UNDECODABLE * len(text)):
        raise EmptyCorpus(f"corpus file {file} is binary, not UTF-8 text; give a text file or folder")


def _file_documents(files: Iterable[Path]) -> Iterator[str]:
    for file in files:
        check_text_file(file)
        yield from _READERS[file_format(file)](_lines(file))


#: Seconds the one hub request before streaming WikiText-103 may take; past it the hub counts as unreachable.
WIKITEXT_PROBE_TIMEOUT_S = 5.0


def _probe_wikitext(name: str) -> None:
    """Raise the one-line :class:`KeyscopeError` at once when the hub cannot serve dataset ``name`` (offline mode,
    no network): one request with a short timeout and no retries, instead of the retries ``datasets``
    runs (and prints) before giving up."""
    from huggingface_hub import HfApi, is_offline_mode

    reason = "HF_HUB_OFFLINE is set" if is_offline_mode() else None
    if reason is None:
        try:
            HfApi().dataset_info(name, timeout=WIKITEXT_PROBE_TIMEOUT_S)
        except Exception as exc:  # any failure of this one request (DNS, refused, timeout, 5xx)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    if reason is not None:
        raise KeyscopeError(f"WikiText-103, the default corpus of a real model, is not reachable ({reason}); "
                            f"pass --corpus with a text file or folder (WikiText, WikiExtractor or plain text)")


def _wikitext_documents() -> Iterator[str]:
    """WikiText-103 articles: lines grouped at the top-level `` = Title = `` headings."""
    try:
        import datasets
    except ImportError as exc:
        raise KeyscopeError(
            "the WikiText-103 corpus needs the `datasets` library (pip install datasets); "
            "or pass a text file/folder or a list of strings as the corpus"
        ) from exc
    name, config, split = WIKITEXT_DATASET
    _probe_wikitext(name)
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
        iterator = iter(rows)
        first = next(iterator)
    except Exception as exc:  # offline, missing cache, hub errors: all one line for the user
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KeyscopeError(
            f"WikiText-103 is not available here ({detail[:160]}); download it once with internet access "
            f"or pass a text file/folder or a list of strings as the corpus"
        ) from exc

    yield from _wikitext_articles(row["text"].rstrip("\n") for row in _chain_first(first, iterator))


def _chain_first(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _detokenize(text: str) -> str:
    for old, new in _WIKITEXT_DETOKENIZE:
        text = text.replace(old, new)
    return text


def documents(source: Source) -> Iterator[str]:
    """Yield the text documents of ``source`` (see the module docstring for the kinds of source).

    Raises :class:`KeyscopeError` with one line when the source cannot be found or loaded. An empty source
    simply yields nothing; :func:`token_batches` turns that into :class:`EmptyCorpus`.
    """
    named = _named(source)
    if named == FACTWORLD:
        from keyscope.factworld.corpus import filler_documents  # lazy: factworld is optional here

        yield from filler_documents(seed=0)
    elif named == WIKITEXT:
        yield from _wikitext_documents()
    elif isinstance(source, (str, Path)):
        path = _resolve_path(source)
        yield from _file_documents(_text_files(path))
    else:
        for doc in source:
            if not isinstance(doc, str):
                raise KeyscopeError(f"corpus documents must be strings, got {type(doc).__name__}")
            yield doc


def corpus_id(source: Source) -> str:
    """A stable name for ``source`` in cache keys.

    Named corpora are named (``factworld:seed=0``, ``Salesforce/wikitext:wikitext-103-raw-v1:train``);
    files and folders by their resolved paths, sizes and modification times; lists of strings by a hash of
    their contents.
    """
    named = _named(source)
    if named == FACTWORLD:
        from dataclasses import asdict

        from keyscope.factworld.world import WorldConfig

        world = hashlib.sha256(repr(sorted(asdict(WorldConfig()).items())).encode()).hexdigest()[:12]
        return f"factworld:seed=0:world={world}"
    if named == WIKITEXT:
        return ":".join(WIKITEXT_DATASET)
    if not isinstance(source, (str, Path, list, tuple)):
        raise KeyscopeError("a one-shot iterator of documents has no stable corpus id; pass a list, a path or a name")
    digest = hashlib.sha256()
    if isinstance(source, (str, Path)):
        path = _resolve_path(source).resolve()
        for file in _text_files(path):
            stat = file.stat()
            digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        return f"files:{path}:{digest.hexdigest()[:16]}"
    count = 0
    for doc in source:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
        count += 1
    return f"texts:{count}:{digest.hexdigest()[:16]}"


class ContextSource:
    """The unrelated text of a run's long contexts (:func:`keyscope.data.perturbations.long_context`), so that each
    context has text of its own.

    One object serves a whole run, every fact's contexts being taken from it in turn. :meth:`take` joins the
    next documents of ``source`` (a corpus source, or any iterable of documents), in the corpus's order and
    skipping blank ones, with spaces, until the text holds enough tokens: a document too short for a context
    is followed by the next one. The order is the corpus's own (factworld's filler stream is seeded), so the
    k-th context of a run is the same text in every run and on every rank, whatever the seed; a stream
    (WikiText-103, factworld) is read only as far as the contexts need.

    A finite corpus whose documents are all taken goes on with the rest of each document that a context
    began (from the first word after the last token it could use), in the same order, so no text serves two
    contexts while there is any left. Only then does it start over at its first document: a warning, once,
    says after how many contexts, and :attr:`n_reused` counts the contexts that reuse text. A corpus without
    text, or whose whole text holds fewer tokens than one context takes, is :class:`EmptyCorpus`. Every
    :meth:`take` should count with the same tokenizer.
    """

    def __init__(self, source: Source | Iterable[str]):
        literal = isinstance(source, (list, tuple))
        self.name = (f"the {len(source)} context documents given" if literal else
                     f"the corpus {source}" if isinstance(source, (str, Path)) else "the context documents")
        self._stream = iter(documents(source) if literal or isinstance(source, (str, Path)) else source)
        self._streaming = True
        self._documents: list[str] = []  # the non-blank documents read, in order
        self._rest: deque[tuple[int, int]] = deque()  # (document, first character) of text no context took
        self._total: int | None = None  # tokens in the whole corpus, counted once it is used up
        self._restarts = 0
        #: Contexts taken, and how many of them reuse text an earlier one took (the corpus was used up).
        self.n_taken = 0
        self.n_reused = 0

    @classmethod
    def of(cls, context: ContextSource | Source | Iterable[str] | None) -> ContextSource | None:
        """``context`` itself if it is a :class:`ContextSource` (or ``None``: no long contexts), else one over it
        (an iterator stays shared: the new source reads on where it stands). Each study calls this once per run,
        so that its facts share one source."""
        return context if context is None or isinstance(context, ContextSource) else cls(context)

    def _piece(self) -> tuple[int, int] | None:
        """``(document, first character)`` of the next text no context took: the corpus's next document while
        it lasts, then the rests of documents; ``None`` when there is none."""
        if self._streaming:
            for doc in self._stream:
                if doc.strip():
                    self._documents.append(doc)
                    return len(self._documents) - 1, 0
            self._streaming = False
        return self._rest.popleft() if self._rest else None

    def take(self, tokenizer, n_tokens: int, spare: int = 0) -> str:
        """The next context's text: the next pieces of text, joined with spaces, until ``tokenizer`` counts at
        least ``n_tokens + spare`` tokens in it (no special tokens) — or the whole corpus, when it holds fewer
        but at least ``n_tokens``. The text after the first ``n_tokens + spare`` tokens is left for later
        contexts.

        Raises :class:`EmptyCorpus` (one line, with the counts) when the whole corpus holds fewer than
        ``n_tokens`` tokens, or no text at all.
        """
        if n_tokens < 1:
            raise ValueError(f"a long context needs at least one token, not {n_tokens}")
        need = n_tokens + spare
        text, reused = "", False
        while True:
            piece = self._piece()
            if piece is None:  # every text has served a context
                if self._total is None:
                    if not self._documents:
                        raise EmptyCorpus(f"no text for long contexts in {self.name}; give a corpus with text")
                    self._total = len(tokenizer(" ".join(self._documents), add_special_tokens=False)["input_ids"])
                if self._total < n_tokens:
                    raise EmptyCorpus(f"only {self._total:,} tokens of text in {self.name}, fewer than the "
                                      f"{n_tokens:,} of one long context; give a larger corpus or ask for shorter "
                                      f"contexts")
                if self._total < need:  # one context takes the whole corpus, every time
                    text, reused = " ".join(self._documents), self.n_taken > 0
                    break
                self._rest.extend((i, 0) for i in range(len(self._documents)))  # start over
                self._restarts += 1
                continue
            reused |= self._restarts > 0
            index, start = piece
            text = f"{text} {self._documents[index][start:]}" if text else self._documents[index][start:]
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if len(offsets) >= need:
                self._keep_rest(text, piece, offsets[need - 1][1])
                break
        if reused and not self.n_reused:
            contexts = f"{self.n_taken:,} long context{'s' * (self.n_taken != 1)}"
            warnings.warn(f"{self.name} ran out after {contexts} with text of their own ({len(self._documents):,} "
                          f"documents, {self._total:,} tokens): the later contexts reuse its text from the start "
                          f"(give a larger corpus for text of their own)", stacklevel=2)
        self.n_taken += 1
        self.n_reused += reused
        return text

    def _keep_rest(self, text: str, piece: tuple[int, int], end: int) -> None:
        """Queue the rest of ``piece`` (the last piece of ``text``) from the first word after character ``end``
        of ``text`` (where the last token a context may use ends), if any is left."""
        index, start = piece
        doc = self._documents[index]
        cut = start + max(0, end - (len(text) - len(doc) + start))  # in doc
        word = _NEXT_WORD.search(doc, cut)
        if word is not None:
            self._rest.append((index, word.start()))


#: The first character of a word that starts at or after a position (what follows whitespace).
_NEXT_WORD = re.compile(r"(?<=\s)\S")


@dataclass(frozen=True)
class TokenBatch:
    """A batch of token windows.

    ``input_ids`` and ``attention_mask`` are ``(batch, seq_len)``; ``key_mask`` marks the positions whose
    keys count (``attention_mask`` minus the BOS column), so ``key_mask.sum()`` tokens are counted.
    """

    input_ids: torch.Tensor  # (batch, seq_len)
    attention_mask: torch.Tensor  # (batch, seq_len)
    key_mask: torch.Tensor  # (batch, seq_len) bool

    @property
    def n_tokens(self) -> int:
        return int(self.key_mask.sum())


def prepends_bos(tokenizer, prepend_bos: bool | None = None) -> bool:
    """Whether sequences start with BOS under :func:`keyscope.data.prompts.encode`'s ``prepend_bos`` convention."""
    if prepend_bos is not None:
        return bool(prepend_bos)
    encoded = encode(tokenizer, "a")
    return bool(encoded.ids) and encoded.special[0] and encoded.ids[0] == tokenizer.bos_token_id


def _token_stream(tokenizer, docs: Iterable[str], chunk: int = 64) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens), followed by EOS as a document separator."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pending: list[str] = []

    def flush() -> Iterator[list[int]]:
        for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
            if ids:
                yield list(ids) + ([int(eos)] if eos is not None else [])

    for doc in docs:
        if doc.strip():
            pending.append(doc)
        if len(pending) >= chunk:
            yield from flush()
            pending = []
    if pending:
        yield from flush()


def token_batches(
    tokenizer,
    source: Source | Iterable[str],
    n_tokens: int,
    seq_len: int = 256,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
) -> Iterator[TokenBatch]:
    """Pack the documents of ``source`` into ``(batch_size, seq_len)`` windows holding ``n_tokens`` counted tokens.

    Documents are tokenised without special tokens and concatenated with the tokenizer's EOS between them
    (GPT-style packing; a document longer than a window continues in the next window). Each window starts
    with BOS when the model's sequences do (``prepend_bos``, see :func:`prepends_bos`); BOS and right
    padding are excluded from ``key_mask``, so exactly ``n_tokens`` positions are counted over all batches
    — fewer only if the corpus runs out. The last window and batch may be short (right-padded, with
    ``attention_mask`` 0).

    Raises :class:`EmptyCorpus` if the source yields no tokens, or if, by any batch, more than half of the
    tokens taken are the tokenizer's unknown token (text in a script or encoding the tokenizer does not read).
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, not {n_tokens}")
    bos = prepends_bos(tokenizer, prepend_bos)
    width = seq_len - int(bos)
    if width < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for tokens after BOS")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    docs = source if not isinstance(source, (str, Path, list, tuple)) else documents(source)

    remaining = n_tokens
    windows: list[list[int]] = []
    buffer: list[int] = []
    total = 0
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None)):
        unk = None  # GPT-2 style: the "unknown" token is the EOS separator, and byte-level BPE never needs it
    unknown = 0

    def check_known() -> None:
        if unk is not None and unknown > total / 2:
            raise EmptyCorpus(f"{unknown} of the first {total} corpus tokens are the tokenizer's unknown token "
                              f"{tokenizer.unk_token!r}: the corpus is not text this tokenizer reads")

    def make_batch(rows: list[list[int]]) -> TokenBatch:
        input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)  # (batch, seq_len)
        attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)  # (batch, seq_len)
        for r, row in enumerate(rows):
            full = ([tokenizer.bos_token_id] if bos else []) + row
            input_ids[r, : len(full)] = torch.as_tensor(full, dtype=torch.long)
            attention_mask[r, : len(full)] = 1
        key_mask = attention_mask.bool()  # (batch, seq_len)
        if bos:
            key_mask[:, 0] = False
        return TokenBatch(input_ids, attention_mask, key_mask)

    for ids in _token_stream(tokenizer, docs):
        buffer.extend(ids)
        while len(buffer) >= width and remaining > 0:
            take = min(width, remaining)
            windows.append(buffer[:take])
            buffer = buffer[take:]
            remaining -= take
            total += take
            unknown += windows[-1].count(unk) if unk is not None else 0
            if len(windows) == batch_size:
                check_known()
                yield make_batch(windows)
                windows = []
        if remaining == 0:
            break
    if remaining > 0 and buffer:
        take = min(len(buffer), remaining)
        windows.append(buffer[:take])
        total += take
        unknown += windows[-1].count(unk) if unk is not None else 0
    if windows:
        check_known()
        yield make_batch(windows)
    if total == 0:
        raise EmptyCorpus("the corpus yielded no tokens; give a non-empty list of strings, text file or folder")
