"""Editing: one interface for locate-and-edit methods and its registry (:mod:`keyscope.editing.base`), the
methods (:mod:`~keyscope.editing.rome`, :mod:`~keyscope.editing.rep`, :mod:`~keyscope.editing.memit`) and the
contract every editor is checked against (:mod:`keyscope.editing.checks`).

Layer 5: above the analysis. The registry's public names are re-exported here
(``from keyscope.editing import make_editor, EDITORS``); keyscope's own code imports them from
:mod:`keyscope.editing.base`.
"""

from keyscope.editing.base import (
    EDITORS,
    EditContext,
    Editor,
    GatedEdit,
    ModelEdit,
    RunInputs,
    UnknownMethod,
    editor_class,
    make_editor,
    prepare_context,
)

__all__ = ["EDITORS", "Editor", "ModelEdit", "GatedEdit", "EditContext", "RunInputs", "prepare_context",
           "make_editor", "editor_class", "UnknownMethod"]
