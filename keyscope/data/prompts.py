"""Prompts and tokens: filling a template with a subject, tokenising as the model will, padding batches.

These helpers read text and tokenizers only (no model code): a fact is a prompt **template** with ``{}``
where the subject goes (:data:`SLOT`) or an already-filled prompt, and :func:`fill` finds the subject
occurrence to use; :func:`encode` tokenises once, with character offsets, and :func:`locate` finds the
subject's last token; :func:`length_batches` and :func:`pad_batch` group and pad token sequences.

Token convention
----------------
Every index this module returns is a position in the **model's token sequence**, the exact sequence
:func:`keyscope.analysis.keys.collect_keys` feeds the model: ``model.tokenizer(text)`` with its special tokens. A
model loaded with :func:`keyscope.model.models.load_model` tokenises as it was trained, with its own tokenizer's BOS
convention (the bridge's prepended BOS is removed where the model's tokenizer adds none): position 0 is the BOS
for LLaMA-2 and factworld, whose first word is at position 1, and the first word itself for GPT-2 and SmolLM2.
``prepend_bos=True/False``
forces a BOS in or out; ``None`` (the default) keeps whatever the tokenizer does. The same ``prepend_bos``
must be used to locate the subject and to run the model, which :func:`keyscope.analysis.keys.collect_keys` guarantees.

The subject's last token is found from **one** tokenisation of the whole filled prompt, with the
tokenizer's character offsets: it is the last non-special token whose character span overlaps the
subject's span. Byte-level BPE (GPT-2) and SentencePiece-style (``▁``) tokenizers report offsets that may
include the leading space of a word; a token that only holds that space does not overlap the subject and
is not chosen. When the subject does not end on a token boundary (``"Pari"`` in ``"Paris"``) the token that
holds its last character is used.

Padding
-------
Batches are padded on the **right** by default, with an explicit attention mask. Right padding is exact
for a causal model: real tokens never attend to the pads after them and keep positions ``0..n-1``. Left
padding is supported too: the bridge derives ``position_ids`` from the attention mask (``cumsum - 1``), so
absolute (GPT-2) and rotary (LLaMA, Mistral, GPT-NeoX) positions are the unpadded ones and the keys agree
with right padding to float tolerance (the tests check both on every tiny architecture).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from keyscope._infra.errors import SubjectNotFound

SLOT = "{}"


@dataclass(frozen=True)
class Encoded:
    """One tokenised text: ids, character offsets and which tokens are special (BOS/EOS/…)."""

    text: str
    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    special: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class SubjectSpan:
    """A filled prompt and the character span ``[start, end)`` of the subject occurrence to use."""

    text: str
    start: int
    end: int

    @property
    def subject(self) -> str:
        """The subject as written in :attr:`text`."""
        return self.text[self.start : self.end]

    @property
    def template(self) -> str:
        """:attr:`text` with a single ``{}`` at this subject occurrence."""
        return self.text[: self.start] + SLOT + self.text[self.end :]


_APOSTROPHES = "'\u2019\u2018\u02bc"


def _lenient_pattern(subject: str) -> re.Pattern:
    """``subject`` as a regex that ignores case, whitespace runs and apostrophe style."""
    parts = []
    for word in subject.split():
        parts.append("".join(f"[{_APOSTROPHES}]" if ch in _APOSTROPHES else re.escape(ch) for ch in word))
    return re.compile(r"\s+".join(parts), re.IGNORECASE)


def fill(prompt: str, subject: str, lenient: bool = False) -> SubjectSpan:
    """Fill ``prompt`` with ``subject`` and locate the subject occurrence to use.

    * A **template** (``prompt`` contains ``{}``): every ``{}`` is replaced by the subject and the *first*
      slot is the occurrence used, even if the subject also appears elsewhere in the text
      (``"{} and Paris"`` with subject ``"Paris"`` uses the first ``Paris``).
    * An **already-filled prompt** (no ``{}``): the *first* occurrence of ``subject`` is used. If the
      exact string is absent, both are compared in Unicode NFC form (``"Café"`` written with a combining
      accent) and the NFC prompt is the text returned. With ``lenient=True`` (reading dataset files) a
      subject still absent is searched ignoring case, runs of whitespace and the ``'``/``’`` apostrophe
      difference; :attr:`SubjectSpan.subject` is then the subject as written in the prompt.

    :attr:`SubjectSpan.template` turns a prompt into a template with one ``{}`` at the occurrence used.
    Raises :class:`SubjectNotFound` for an empty subject or one that does not occur in the prompt.
    """
    if not subject or not subject.strip():
        raise SubjectNotFound(f"empty subject for prompt {prompt!r}; give the subject string to locate")
    if SLOT in prompt:
        prefix, rest = prompt.split(SLOT, 1)
        text = prefix + subject + rest.replace(SLOT, subject)
        return SubjectSpan(text, len(prefix), len(prefix) + len(subject))
    start = prompt.find(subject)
    if start < 0:
        prompt_nfc, subject_nfc = unicodedata.normalize("NFC", prompt), unicodedata.normalize("NFC", subject)
        start = prompt_nfc.find(subject_nfc)
        if start < 0 and lenient:
            match = _lenient_pattern(unicodedata.normalize("NFC", subject.strip())).search(prompt_nfc)
            if match is not None:
                return SubjectSpan(prompt_nfc, match.start(), match.end())
        if start < 0:
            raise SubjectNotFound(
                f"subject {subject!r} does not occur in prompt {prompt!r}; write the prompt as a template with "
                f"{{}} where the subject goes, or fix the subject's spelling"
            )
        prompt, subject = prompt_nfc, subject_nfc
    return SubjectSpan(prompt, start, start + len(subject))


def _bos_id(tokenizer) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else None


def encode(tokenizer, text: str, prepend_bos: bool | None = None) -> Encoded:
    """Tokenise ``text`` once, with offsets, as the model will see it.

    ``prepend_bos=None`` keeps the tokenizer's own special tokens (a ``TransformerBridge`` tokenizer
    prepends BOS); ``True`` adds a BOS (offset ``(0, 0)``) if the tokenizer did not; ``False`` removes a
    leading BOS.
    """
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    special = [i in special_ids and s == e for i, (s, e) in zip(ids, offsets)]
    bos = _bos_id(tokenizer)
    has_bos = bool(ids) and bos is not None and ids[0] == bos and special[0]
    if prepend_bos and not has_bos:
        if bos is None:
            raise ValueError(f"prepend_bos=True but the tokenizer {type(tokenizer).__name__} has no BOS token")
        ids, offsets, special = [bos, *ids], [(0, 0), *offsets], [True, *special]
    elif prepend_bos is False and has_bos:
        ids, offsets, special = ids[1:], offsets[1:], special[1:]
    return Encoded(text, tuple(ids), tuple(offsets), tuple(special))


def tokens_overlapping(encoded: Encoded, start: int, end: int) -> list[int]:
    """Indices of the non-special tokens whose character span overlaps ``[start, end)``."""
    return [
        i
        for i, ((s, e), sp) in enumerate(zip(encoded.offsets, encoded.special))
        if not sp and e > s and s < end and e > start
    ]


def locate(tokenizer, prompt: str, subject: str, prepend_bos: bool | None = None) -> tuple[Encoded, int]:
    """The tokenised filled prompt and the index of the subject's last token in it (see :func:`fill`)."""
    span = fill(prompt, subject)
    encoded = encode(tokenizer, span.text, prepend_bos=prepend_bos)
    hits = tokens_overlapping(encoded, span.start, span.end)
    if not hits:
        raise SubjectNotFound(
            f"subject {subject!r} has no token in the tokenisation of {span.text!r} (was the text truncated?)"
        )
    return encoded, hits[-1]


def subject_last_index(tokenizer, prompt: str, subject: str, prepend_bos: bool | None = None) -> int:
    """Index of the subject's last token in the model's token sequence of the filled prompt.

    ``prompt`` is a template with ``{}`` (whose first slot picks the occurrence) or an already-filled
    prompt (first occurrence); see :func:`fill`. The index counts the BOS when one is prepended (see the
    module's token convention), so ``keys[:, index]`` of a forward pass on ``encode(...).ids`` is the key.
    Raises :class:`SubjectNotFound` if the subject is not in the prompt.
    """
    return locate(tokenizer, prompt, subject, prepend_bos=prepend_bos)[1]


#: Padded positions per batch above which :func:`length_batches` starts a new batch (a 300-token long context
#: must not pad thirty short prompts to its width).
MAX_BATCH_TOKENS = 4096


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Indices of sequences of ``lengths`` grouped into batches, shortest first: at most ``batch_size`` rows,
    and no more than ``max_tokens`` padded positions (rows × longest) unless a single row is longer."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if current and (len(current) == batch_size or (len(current) + 1) * lengths[i] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right", device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id sequences to ``(batch, max_len)`` ids and a 1/0 attention mask."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (batch, pos)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (batch, pos)
    for row, seq in enumerate(sequences):
        cols = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        input_ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids.to(device), attention_mask.to(device)
def unknown_pieces(tokenizer, encoded: Encoded, start: int = 0, end: int | None = None) -> list[str]:
    """The pieces of ``encoded.text`` within ``[start, end)`` that the tokenizer mapped to its unknown token
    (``<unk>``), in order, adjacent ones joined (``"Жюль"``, not four letters); ``[]`` for a tokenizer without
    one (byte-level BPE never needs it)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    end = len(encoded.text) if end is None else end
    spans: list[list[int]] = []
    for i in tokens_overlapping(encoded, start, end):
        if encoded.ids[i] == unk:
            s, e = encoded.offsets[i]
            if spans and s <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], e)
            else:
                spans.append([s, e])
    return [encoded.text[s:e].strip() or repr(encoded.text[s:e]) for s, e in spans]


def unknown_token_message(tokenizer, pieces: Sequence[str], what: str) -> str:
    """``"the tokenizer maps 'Жюль' of <what> to its unknown token '<unk>'"``: the one wording of the unknown-token
    errors and failures, naming the text (``pieces`` from :func:`unknown_pieces`)."""
    return (f"the tokenizer maps {', '.join(map(repr, pieces))} of {what} to its unknown token "
            f"{getattr(tokenizer, 'unk_token', None)!r}")


def unknown_subject_pieces(tokenizer, prompt: str, subject: str, prepend_bos: bool | None = None) -> list[str]:
    """:func:`unknown_pieces` of the subject's occurrence in the filled ``prompt`` (see :func:`fill`): a
    non-empty list means the subject's key is (partly) the key of ``<unk>``, not of the subject."""
    span = fill(prompt, subject)
    return unknown_pieces(tokenizer, encode(tokenizer, span.text, prepend_bos=prepend_bos), span.start, span.end)


