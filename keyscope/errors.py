"""User-facing errors.

Every error a user can cause (a model that is not available, a subject missing from its prompt, a layer
out of range, an empty corpus, a malformed dataset record, a corrupt cache) is a :class:`KeyscopeError`
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
    """A corpus that yields no usable tokens."""


class MalformedRecord(KeyscopeError):
    """A dataset record that is missing a field or has one of the wrong type."""


class CorruptCache(KeyscopeError):
    """A cached artefact that is truncated or does not match its spec."""
