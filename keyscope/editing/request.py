"""An edit request: one fact to write into a model, and the checks every method makes of it.

A request is a prompt with the subject's slot, the subject, the new target and (recorded only) the true one
(CounterFact's ``requested_rewrite``, kmeng01/rome ``rome/rome_main.py``). Every locate-and-edit method reads its
key at the subject's last token and teaches the new target by teacher forcing after the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from keyscope._infra.errors import KeyscopeError, MalformedRecord, UnknownToken
from keyscope.data.prompts import SLOT, encode, fill, unknown_pieces, unknown_token_message

__all__ = ["EditRequest", "EmptyTarget", "TargetTokenization", "as_request", "check_request_tokens"]


class EmptyTarget(KeyscopeError):
    """An edit request whose new target is empty or whitespace."""


class TargetTokenization(KeyscopeError):
    """A target whose first token would merge with the end of the prompt."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` (a template with ``{}`` for the subject, or a filled prompt holding
    ``subject``), the ``subject``, the new target ``target_new`` and optionally the true one (recorded only).

    Raises :class:`~keyscope._infra.errors.SubjectNotFound` if the subject is not in the prompt,
    :class:`~keyscope._infra.errors.MalformedRecord` for a field that is not a string or a prompt with more than one
    ``{}`` slot (each slot would be filled with the subject, and the edit would write at the first only), and
    :class:`EmptyTarget` for an empty target.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        for name in ("prompt", "subject"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise MalformedRecord(f"edit request field {name!r} must be a string, not {type(value).__name__}")
        if self.prompt.count(SLOT) > 1:
            raise MalformedRecord(f"prompt {self.prompt!r} has {self.prompt.count(SLOT)} subject slots {SLOT}; "
                                  f"give exactly one, where the edited subject goes")
        fill(self.prompt, self.subject)  # raises SubjectNotFound
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise EmptyTarget(
                f"empty target_new for {fill(self.prompt, self.subject).text!r}; give the new object to write"
            )

    @property
    def template(self) -> str:
        """The prompt with exactly one ``{}`` at the subject occurrence that is edited."""
        return fill(self.prompt, self.subject).template

    @classmethod
    def from_dict(cls, record: Mapping) -> EditRequest:
        """From a CounterFact-style record: ``prompt``, ``subject``, ``target_new`` (a string or
        ``{"str": ...}``) and optionally ``target_true``. Raises :class:`~keyscope._infra.errors.MalformedRecord` for
        a missing field."""

        def text(value):
            return value.get("str") if isinstance(value, Mapping) else value

        if not isinstance(record, Mapping):
            raise MalformedRecord(f"an edit request must be a mapping, not {type(record).__name__}")
        missing = [name for name in ("prompt", "subject", "target_new") if record.get(name) is None]
        if missing:
            raise MalformedRecord(f"edit request lacks {', '.join(missing)} (it has {', '.join(map(str, record)) or 'nothing'}); "
                                  f"give prompt (with {SLOT} for the subject), subject and target_new")
        return cls(record["prompt"], record["subject"], text(record["target_new"]), text(record.get("target_true")))


def as_request(request) -> EditRequest:
    if isinstance(request, EditRequest):
        return request
    if isinstance(request, Mapping):
        return EditRequest.from_dict(request)
    raise MalformedRecord(f"request must be an EditRequest or a mapping, not {type(request).__name__}")


def check_request_tokens(tokenizer, request: EditRequest, prepend_bos: bool | None = None) -> None:
    """Raise :class:`~keyscope._infra.errors.UnknownToken` (naming the text) when the tokenizer maps part of the
    request's subject (in its filled prompt) or of its new target to its unknown token: the subject's key
    would be ``<unk>``'s, and v* would be optimised toward ``<unk>``."""
    request = as_request(request)
    span = fill(request.template, request.subject)
    separator = "" if span.text[-1:].isspace() or request.target_new[:1].isspace() else " "  # as teacher_forced
    text = span.text + separator + request.target_new
    encoded = encode(tokenizer, text, prepend_bos=prepend_bos)
    for what, value, start, end in (("subject", request.subject, span.start, span.end),
                                    ("target", request.target_new, len(span.text) + len(separator), len(text))):
        pieces = unknown_pieces(tokenizer, encoded, start, end)
        if pieces:
            consequence = "its key would be that token's" if what == "subject" else "ROME would write that token"
            raise UnknownToken(f"{unknown_token_message(tokenizer, pieces, f'the {what} {value!r}')}; "
                               f"{consequence}, not the {what}")
