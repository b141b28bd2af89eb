"""No process-wide side effects: importing keyscope (every module of it) changes no logger level and no global
random state, loading a model restores the logger levels it quietens (also when the load fails), and no
module keeps facts about a model in ``keyscope_*`` attributes hung on it."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keyscope.model.models import NOISY_LOGGERS, load_model

PACKAGE = Path(__file__).resolve().parents[1] / "keyscope"

#: Run in a fresh interpreter: import the third-party libraries keyscope builds on first (their own import-time
#: logging set-up is theirs), take a snapshot of the process state, import every keyscope module, compare.
IMPORT_EVERYTHING = r"""
import json, logging, pkgutil, importlib, random, warnings
import numpy as np, torch, transformers, transformer_lens  # noqa: F401

def state():
    loggers = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)}
    return {"loggers": {"": logging.root.level, **loggers},
            "disabled": logging.root.manager.disable,
            "torch_rng": torch.random.get_rng_state().tolist(),
            "numpy_rng": str(np.random.get_state()[1].tolist()),
            "python_rng": str(random.getstate()),
            "threads": torch.get_num_threads(),
            "dtype": str(torch.get_default_dtype()),
            "grad": torch.is_grad_enabled(),
            "warning_filters": len(warnings.filters)}

before = state()
import keyscope
names = sorted(m.name for m in pkgutil.walk_packages(keyscope.__path__, "keyscope."))
for name in names:
    importlib.import_module(name)
after = state()
print(json.dumps({"before": before, "after": after, "modules": names}))
"""


def test_importing_every_keyscope_module_changes_no_process_state():
    done = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = result["before"], result["after"]
    assert {"keyscope.cli", "keyscope.model.models", "keyscope.editing.base", "keyscope.evaluation.metrics"} <= set(result["modules"])
    assert len(result["modules"]) >= 30
    changed = {name: (level, after["loggers"][name]) for name, level in before["loggers"].items()
               if after["loggers"][name] != level}
    assert changed == {}, f"logger levels changed by importing keyscope: {changed}"
    new = {name: level for name, level in after["loggers"].items() if name not in before["loggers"] and level}
    assert new == {}, f"loggers created with a level by importing keyscope: {new}"
    for key in ("disabled", "torch_rng", "numpy_rng", "python_rng", "threads", "dtype", "grad", "warning_filters"):
        assert after[key] == before[key], key


def _levels() -> dict[str, int]:
    return {name: logging.getLogger(name).level for name in (*NOISY_LOGGERS, "")}


def test_loading_a_model_restores_logger_levels_and_the_global_generator(tiny_checkpoints, tmp_path):
    from transformers.utils import logging as hf_logging

    from keyscope._infra.errors import KeyscopeError

    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    saved = [logger.level for logger in loggers]
    try:
        for logger, level in zip(loggers, (logging.INFO, logging.DEBUG, logging.WARNING)):
            logger.setLevel(level)  # levels a user chose: not the libraries' defaults
        levels, bars, rng = _levels(), hf_logging.is_progress_bar_enabled(), torch.random.get_rng_state()
        load_model(str(tiny_checkpoints["gpt2"]))
        assert _levels() == levels and hf_logging.is_progress_bar_enabled() == bars
        assert torch.equal(torch.random.get_rng_state(), rng)
        broken = tmp_path / "broken"  # a config but no weights: the load fails inside the bridge
        broken.mkdir()
        (broken / "config.json").write_text((tiny_checkpoints["gpt2"] / "config.json").read_text())
        with pytest.raises(KeyscopeError):
            load_model(str(broken))
        assert _levels() == levels and hf_logging.is_progress_bar_enabled() == bars  # restored on failure too
        assert torch.equal(torch.random.get_rng_state(), rng)
    finally:
        for logger, level in zip(loggers, saved):
            logger.setLevel(level)


def keyscope_attributes(source: str) -> list[str]:
    """``line: use`` of every ``x.keyscope_…`` and ``getattr/setattr/hasattr/delattr(x, "keyscope_…")`` in
    ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("keyscope_"):
            found.append(f"{node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("keyscope_")):
            found.append(f"{node.lineno}: {node.func.id}({node.args[1].value!r})")
    return found


def test_no_module_reads_or_writes_keyscope_attributes_on_a_model():
    """Facts about a model live beside it (``keyscope.model.models.model_source``), never as ``keyscope_*``
    attributes hung on the bridge."""
    caught = keyscope_attributes('layer = getattr(model, "keyscope_layer", 3)\nmodel.keyscope_source = s\n'
                                 'setattr(model, "keyscope_x", 1)\nkey = {"keyscope_version": 1}\n')
    assert caught == ["1: getattr('keyscope_layer')", "2: .keyscope_source", "3: setattr('keyscope_x')"]
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 30
    found = {str(path.relative_to(PACKAGE.parent)): keyscope_attributes(path.read_text(encoding="utf-8"))
             for path in files}
    assert {path: uses for path, uses in found.items() if uses} == {}
