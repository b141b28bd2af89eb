"""Loading models and the one place that knows their architecture.

Every model keyscope touches is a TransformerLens 4 :class:`TransformerBridge` over the real Hugging Face
module, booted **without** compatibility mode: no LayerNorm folding, no weight centring, so the bridge's
``W_out`` *is* the HF down-projection weight and an edit written here is an edit of the HF checkpoint.

Architecture facts live here and nowhere else:

* the **key** of layer ``L`` is the input of the down-projection, hook ``blocks.{L}.mlp.hook_post``
  (for GPT-2's ``gelu(W_in x)`` and for the gated ``silu(W_gate x) * W_up x`` of LLaMA/Mistral alike);
* the **value** is the MLP output, hook ``blocks.{L}.mlp.hook_out``;
* :func:`W_out` returns a writable ``(d_model, d_mlp)`` view of the down-projection, so that
  ``value = W_out @ key (+ b_out)`` whatever the storage: GPT-2's ``Conv1D`` stores the transpose
  ``(d_mlp, d_model)``, ``nn.Linear`` (LLaMA, Mistral, GPT-NeoX, GPT-J) stores ``(d_model, d_mlp)``;
* the default edit layer per model family, from the published ROME / EasyEdit hyper-parameters.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch

from keyscope.errors import LayerOutOfRange, ModelNotAvailable

FACTWORLD = "factworld"

#: Edit layers of the published ROME (Meng et al. 2022) and EasyEdit hyper-parameter files.
PUBLISHED_EDIT_LAYERS: dict[str, int] = {
    "gpt2-medium": 8,
    "openai-community/gpt2-medium": 8,
    "gpt2-large": 12,
    "openai-community/gpt2-large": 12,
    "gpt2-xl": 17,
    "openai-community/gpt2-xl": 17,
    "EleutherAI/gpt-j-6B": 5,
    "EleutherAI/gpt-neox-20b": 15,
    "meta-llama/Llama-2-7b-hf": 5,
    "meta-llama/Llama-2-7b-chat-hf": 5,
    "mistralai/Mistral-7B-v0.1": 5,
    "Qwen/Qwen2.5-7B-Instruct": 5,
}

#: For a model not in the table: the published layer as a fraction of depth for its family
#: (GPT-2 medium/XL edit about a third of the way in; GPT-J, LLaMA-2 and Mistral at 5 of 28-32 layers).
FAMILY_DEPTH_FRACTION: dict[str, float] = {
    "gpt2": 1 / 3,
    "gpt_neox": 15 / 44,
    "gptj": 5 / 28,
    "llama": 5 / 32,
    "mistral": 5 / 32,
    "qwen2": 5 / 28,
}

#: Name of the small JSON file a keyscope-built model directory carries (e.g. factworld's default layer).
MODEL_CARD = "keyscope.json"


def key_hook(layer: int) -> str:
    """TransformerLens hook whose activation is the layer-``layer`` key: the input of ``W_out``."""
    return f"blocks.{layer}.mlp.hook_post"


def value_hook(layer: int) -> str:
    """TransformerLens hook whose activation is the layer-``layer`` value: the MLP output."""
    return f"blocks.{layer}.mlp.hook_out"


def factworld_model_dir() -> Path:
    """The factworld model shipped inside the package (a standard HF directory)."""
    return Path(__file__).resolve().parent / "factworld" / "model"


def resolve_model_path(name_or_path: str) -> str:
    """Map ``"factworld"`` to the shipped directory; leave hub names and local paths unchanged."""
    if name_or_path == FACTWORLD:
        return str(factworld_model_dir())
    return name_or_path


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub name (hub names are ``name`` or ``org/name``)."""
    return name_or_path.startswith((".", os.sep, "~")) or name_or_path.count("/") > 1


def load_model(name_or_path: str = FACTWORLD, device: str | None = None, dtype: torch.dtype | None = None):
    """Load ``name_or_path`` as an unprocessed TransformerLens 4 ``TransformerBridge`` in eval mode.

    ``name_or_path`` is ``"factworld"`` (the model shipped with keyscope), a hub name (``gpt2``,
    ``meta-llama/Llama-2-7b-hf``, …; downloaded once and then read from the local HF cache) or a local
    HF directory (``config.json`` + weights + tokenizer). Raises :class:`ModelNotAvailable` with one line
    naming what was tried and how to fix it.
    """
    from transformer_lens.model_bridge import TransformerBridge

    target = resolve_model_path(name_or_path)
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(f"{target} is a directory but holds no config.json; pass a Hugging Face model directory")
        target = str(path.resolve())
    elif name_or_path == FACTWORLD:
        raise ModelNotAvailable(
            f"the factworld model is missing from the installation ({target}); rebuild it with `keyscope factworld train`"
        )
    elif _looks_local(name_or_path):
        raise ModelNotAvailable(f"model directory {name_or_path} does not exist")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or torch.float32
    # transformers logs retries and download noise on stderr; keep the one-line error ours.
    for noisy in ("transformers", "huggingface_hub", "transformer_lens"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = TransformerBridge.boot_transformers(target, device=device, dtype=dtype)
    except (OSError, ValueError, KeyError, EnvironmentError) as exc:  # noqa: UP024 (EnvironmentError is documented by HF)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if path.is_dir():
            raise ModelNotAvailable(f"could not load the model directory {target}: {first}") from exc
        raise ModelNotAvailable(
            f"model {name_or_path!r} is not available here ({first}). Download it once with internet access "
            f"(it is then read from the Hugging Face cache), log in for gated models, or pass a local HF directory"
        ) from exc
    model.eval()
    model.keyscope_name = name_or_path  # type: ignore[attr-defined]
    return model


def model_name(model) -> str:
    """The name the model was loaded under (``factworld``, a hub name or a path)."""
    return getattr(model, "keyscope_name", None) or getattr(model.cfg, "model_name", "model")


def n_layers(model) -> int:
    return int(model.cfg.n_layers)


def d_mlp(model) -> int:
    return int(model.cfg.d_mlp)


def d_model(model) -> int:
    return int(model.cfg.d_model)


def family(model) -> str:
    """The HF ``model_type`` of the wrapped model (``gpt2``, ``llama``, ``mistral``, ``gpt_neox``, …)."""
    return str(getattr(model.original_model.config, "model_type", "unknown"))


def check_layer(model, layer: int) -> int:
    """Return ``layer`` if it is a valid block index, else raise :class:`LayerOutOfRange`."""
    n = n_layers(model)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
        raise LayerOutOfRange(f"layer {layer} is out of range: {model_name(model)} has layers 0..{n - 1}")
    return layer


def model_card(model) -> dict:
    """The ``keyscope.json`` card of a keyscope-built model directory, or ``{}``."""
    name = getattr(model.original_model.config, "_name_or_path", "") or ""
    card = Path(name) / MODEL_CARD
    if name and card.is_file():
        return json.loads(card.read_text())
    return {}


def default_layer(model) -> int:
    """The layer to edit by default.

    In order: the model's own card (factworld records the layer its causal trace found), the published
    ROME/EasyEdit layer for known hub names, and the family's published fraction of depth otherwise.
    """
    card = model_card(model)
    if "default_layer" in card:
        return check_layer(model, int(card["default_layer"]))
    name = model_name(model)
    if name in PUBLISHED_EDIT_LAYERS:
        return check_layer(model, PUBLISHED_EDIT_LAYERS[name])
    fraction = FAMILY_DEPTH_FRACTION.get(family(model), 1 / 3)
    return min(n_layers(model) - 1, max(0, round(fraction * n_layers(model))))


def down_projection(model, layer: int) -> torch.nn.Module:
    """The HF module that computes ``value = W_out @ key``: ``Conv1D`` (GPT-2) or ``nn.Linear``."""
    check_layer(model, layer)
    return model.blocks[layer].mlp.out.original_component


def W_out(model, layer: int) -> torch.Tensor:
    """A writable ``(d_model, d_mlp)`` view of layer ``layer``'s down-projection weight.

    GPT-2's ``Conv1D`` computes ``x @ weight`` with ``weight`` of shape ``(d_mlp, d_model)``, so the view is
    ``weight.T``; ``nn.Linear`` computes ``x @ weight.T`` with ``weight`` of shape ``(d_model, d_mlp)``,
    so the view is ``weight`` itself. Either way ``W_out(model, L) @ key`` is the value (less the bias),
    and an in-place update of the view (``.add_``, ``.copy_``) changes the real parameter.
    """
    module = down_projection(model, layer)
    weight = module.weight
    view = weight.T if type(module).__name__ == "Conv1D" else weight  # (d_model, d_mlp)
    expected = (d_model(model), d_mlp(model))
    if tuple(view.shape) != expected:
        raise RuntimeError(f"W_out of layer {layer} has shape {tuple(view.shape)}, expected {expected}")
    return view


def b_out(model, layer: int) -> torch.Tensor | None:
    """The down-projection bias ``(d_model,)``, or ``None`` for bias-free MLPs (LLaMA, Mistral)."""
    return down_projection(model, layer).bias
