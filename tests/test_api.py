"""The public API: ``keyscope.__all__`` lists names that resolve, lazily."""

from __future__ import annotations

import subprocess
import sys

import keyscope


def test_every_public_name_resolves_to_the_object_of_its_module():
    import importlib

    assert {"load_model", "KeyCovariance", "EditRequest", "EDITORS", "make_editor", "KeyscopeError"} <= set(keyscope.__all__)
    for name in keyscope.__all__:
        value = getattr(keyscope, name)
        if name in keyscope._EXPORTS:
            assert value is getattr(importlib.import_module(keyscope._EXPORTS[name]), name), name
    assert set(keyscope.__all__) <= set(dir(keyscope))


def test_import_keyscope_is_light_and_unknown_names_fail():
    code = "import sys, keyscope; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    try:
        keyscope.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
