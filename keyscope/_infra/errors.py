"""User-facing errors.

Every error a user can cause (a model that is not available, a subject missing from its prompt, a layer
out of range, an empty or unusable corpus, a malformed dataset record or request, a subject or target the
tokenizer does not know, keys of the wrong shape, an unfitted adaptor) is a :class:`KeyscopeError`
whose message is one self-contained line. The CLI prints that line and exits with status 2; library
callers can catch the class (or a subclass) like any exception.
"""

from __future__ import annotations


class KeyscopeError(Exception):
    """An error caused by the user's input; its message is one line that says what to do."""

    exit_code = 2


class ModelNotAvailable(KeyscopeError):
    """The model could not be loaded (offline, misspelt, gated, or not a supported architecture)."""


class LayerOutOfRange(KeyscopeError):
    """A layer index outside ``[0, n_layers)``."""


class SubjectNotFound(KeyscopeError):
    """A subject string that does not occur in its prompt."""


class EmptyCorpus(KeyscopeError):
    """A corpus that yields no usable tokens, or too few: binary, mostly unknown tokens, or far fewer tokens
    than asked for."""


class MalformedRecord(KeyscopeError):
    """A dataset record or edit request that is missing a field or has one of the wrong type."""


class CorruptCache(KeyscopeError):
    """A cached artefact that is truncated or does not match its spec."""


class UnknownToken(KeyscopeError):
    """A subject or target that the tokenizer maps (in part) to its unknown token, so that a key or an edit
    of it would be about ``<unk>`` rather than the text."""


class InvalidKeys(KeyscopeError, ValueError):
    """Keys of the wrong type, shape or width, empty, or not finite."""


class NotFitted(KeyscopeError, RuntimeError):
    """A fitted object (an adaptor, an estimate) used before ``fit``."""


class RankFailed(Exception):
    """Another process of a ``torchrun`` job failed (or a collective with it broke), so this one stops too
    (:mod:`keyscope._infra.distributed`); ``exit_code`` is the failing rank's, so every rank exits alike. Not a
    :class:`KeyscopeError`: a loop that skips an item on bad input (a fact that cannot be scored) must not take
    another rank's failure for one."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def exit_status(exc: BaseException) -> int:
    """The exit status of a command failing with ``exc`` (and what a failing rank reports to the others): a
    :class:`KeyscopeError`'s or :class:`RankFailed`'s own (2 unless set), 2 for an :class:`OSError`, 130 for
    Ctrl-C, else 1."""
    if isinstance(exc, (KeyscopeError, RankFailed)):
        return exc.exit_code
    if isinstance(exc, OSError):
        return 2
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1
