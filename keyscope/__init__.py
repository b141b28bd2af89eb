"""keyscope: analyse and edit the key-value memories inside transformer MLPs.

The *key* of a fact is the input of an MLP's down-projection ``W_out`` at the subject's last token
(TransformerLens hook ``blocks.{L}.mlp.hook_post``); the *value* is its output. keyscope measures how
keys move under rephrased, shuffled and long-context subjects in the whitened space ``C^{-1}`` that
decides how far a ROME edit reaches (Yan et al., "Keys to Robust Edits"), edits facts with ROME and REP,
and checks the paper's bounds on the same hooks.
"""

from keyscope.errors import KeyscopeError

__version__ = "0.1.0"

__all__ = ["KeyscopeError", "__version__"]
