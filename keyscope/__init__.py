"""keyscope: analyse and edit the key-value memories inside transformer MLPs.

The *key* of a fact is the input of an MLP's down-projection ``W_out`` at the subject's last token
(TransformerLens hook ``blocks.{L}.mlp.hook_post``); the *value* is its output. keyscope measures how
keys move under rephrased, shuffled and long-context subjects in the whitened space ``C^{-1}`` that
decides how far a ROME edit reaches (Yan et al., "Keys to Robust Edits"), edits facts with ROME and REP,
and checks the paper's bounds on the same hooks.

The public names below (:data:`__all__`) are imported from their modules on first use (PEP 562), so that
``import keyscope`` stays light and the package imports none of its layers above the errors.
"""

from __future__ import annotations

import importlib

from keyscope._infra.errors import KeyscopeError

__version__ = "0.1.0"

#: Each public name → the module that defines it.
_EXPORTS = {
    # models: loading, the hook names, the edited weight
    "load_model": "keyscope.model.models", "default_layer": "keyscope.model.models", "key_hook": "keyscope.model.models",
    "W_out": "keyscope.model.models",
    # facts
    "Fact": "keyscope.data.datasets", "load_facts": "keyscope.data.datasets", "read_facts": "keyscope.data.datasets",
    "known_facts": "keyscope.analysis.predictions",
    # keys, C = E[k kᵀ] and the whitened metric
    "collect_keys": "keyscope.analysis.keys", "KeyCovariance": "keyscope.analysis.covariance",
    "CovarianceConfig": "keyscope.analysis.covariance", "load_or_compute_covariance": "keyscope.analysis.covariance",
    "edit_strength": "keyscope.analysis.similarity", "whitened_similarity": "keyscope.analysis.similarity",
    # editing
    "EditRequest": "keyscope.editing.request", "ROMEConfig": "keyscope.editing.rome", "REPConfig": "keyscope.editing.rep",
    "MEMITConfig": "keyscope.editing.memit", "EDITORS": "keyscope.editing.base", "Editor": "keyscope.editing.base",
    "ModelEdit": "keyscope.editing.base", "GatedEdit": "keyscope.editing.base", "EditContext": "keyscope.editing.base", "make_editor": "keyscope.editing.base",
    "prepare_context": "keyscope.editing.base", "as_bridge": "keyscope.model.models",
    # one call: edit facts, score them, keep the edited model (EasyEdit's editor.edit)
    "edit": "keyscope.evaluation.session", "EditSession": "keyscope.evaluation.session",
    # evaluation and the causal trace
    "EvalConfig": "keyscope.evaluation.evaluate", "TraceConfig": "keyscope.analysis.trace", "trace_facts": "keyscope.analysis.trace",
}

__all__ = ["KeyscopeError", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'keyscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
