"""The wheel (issue #27): built from the working tree without the network, it holds every file of the package (the
shipped factworld model and its card included), installs, and the installed copy imports as the version the wheel
and the CHANGELOG's newest release name, with its package data readable."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The files of the source tree the build reads (``setup.cfg``'s metadata, ``MANIFEST.in``) besides the package.
BUILD_FILES = ("pyproject.toml", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md")

#: Package data read at run time: the factworld model ``load_model("factworld")`` boots, its tokenizer and the card
#: its world, default layer and ``load_facts("factworld")`` come from.
REQUIRED_DATA = ("keyscope/factworld/model/config.json", "keyscope/factworld/model/model.safetensors",
                 "keyscope/factworld/model/tokenizer.json", "keyscope/factworld/model/tokenizer_config.json",
                 "keyscope/factworld/model/generation_config.json", "keyscope/factworld/model/keyscope.json")

#: What the installed copy reports about itself, run with only the install folder on ``PYTHONPATH``.
PROBE = """
import json
import keyscope
from keyscope.factworld import MODEL_CARD, shipped_model_dir
from safetensors import safe_open
from tokenizers import Tokenizer

folder = shipped_model_dir()
with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
    tensors = len(list(weights.keys()))
print(json.dumps({"file": keyscope.__file__, "version": keyscope.__version__, "model_dir": str(folder),
                  "files": sorted(p.name for p in folder.iterdir()), "tensors": tensors,
                  "card": sorted(json.loads((folder / MODEL_CARD).read_text())),
                  "vocab": Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()}))
"""


def package_files(root: Path = ROOT) -> set[str]:
    """Every file of the package in the source tree (bytecode aside), as paths relative to ``root``."""
    return {p.relative_to(root).as_posix() for p in (root / "keyscope").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


def released_version(changelog: str) -> str:
    """The version of the CHANGELOG's newest released heading (``## 0.1.0 (…)``; ``## Unreleased`` skipped)."""
    match = re.search(r"^## (\d+\.\d+\.\d+\S*)", changelog, flags=re.MULTILINE)
    assert match, "the CHANGELOG has no released version heading"
    return match[1]


def test_released_version_reads_the_newest_release_heading():
    text = "# Changelog\n\n## Unreleased\n\n- x\n\n## 1.2.0 (2027-01-01)\n\n## 1.1.0\n"
    assert released_version(text) == "1.2.0"


@pytest.mark.slow
def test_the_wheel_builds_offline_installs_and_carries_its_package_data(tmp_path):
    source = tmp_path / "src"  # the working tree's files, so the build writes nothing into the repository
    shutil.copytree(ROOT / "keyscope", source / "keyscope", ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(dist), str(source)], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("keyscope-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
    version = re.search(r"^Version: (\S+)$", metadata, flags=re.MULTILINE)[1]
    assert wheel.name.startswith(f"keyscope-{version}-")
    assert set(REQUIRED_DATA) <= package_files()  # the list names files that exist
    assert sorted(package_files() - names) == []  # every module and every data file of the package
    assert not {n for n in names if n.split("/")[0] not in ("keyscope", info.split("/")[0])}  # nothing else

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                                str(site), str(wheel)], capture_output=True, text=True, env=env)
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path,
                           env={**env, "PYTHONPATH": str(site), "KEYSCOPE_CACHE": str(tmp_path / "cache")})
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])

    assert Path(found["file"]).resolve() == (site / "keyscope" / "__init__.py").resolve()
    assert found["version"] == version == released_version((ROOT / "CHANGELOG.md").read_text())
    assert Path(found["model_dir"]).resolve() == (site / "keyscope" / "factworld" / "model").resolve()
    assert {Path(p).name for p in REQUIRED_DATA} <= set(found["files"])
    assert found["tensors"] > 0 and found["vocab"] > 0
    assert {"train_config", "default_layer"} <= set(found["card"]), found["card"]
