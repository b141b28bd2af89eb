"""The ``keyscope`` command line: a thin shell over library functions.

``main(argv) -> int`` is the one place that turns every expected failure into one line on stderr and exit
status 2, with no traceback: a bad argument (``keyscope: error: argument --n: …``), a
:class:`~keyscope._infra.errors.KeyscopeError`, and an :class:`OSError` (an output path that cannot be written, a
full disk). Before a command runs, its output paths (``--out``, ``--json``, ``--export``, ``--write-known``) are
checked; if it fails, they are put back as they were: what it had written there is removed, and the files that were
there before come back with their old content (:func:`keyscope.cli.output.nothing_left_on_failure`). Under
``torchrun`` every error line names its process (``keyscope: error: rank 1 of 2: …``), a failure on any rank
ends every rank (:mod:`keyscope._infra.distributed`: the others print ``… stopped because rank 1 of 2 failed`` and
exit with the failing rank's status) and an unexpected exception prints its traceback, then that line, and
exits 1 — as a single process, where it ends in Python's traceback and status 1. Library
warnings print as one ``keyscope: warning: …`` line each; Ctrl-C prints ``keyscope: interrupted`` and exits
130. Each command lives in its own module here and registers its subparser through ``register(sub)``; no
library module imports this package.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from keyscope._infra.errors import KeyscopeError, RankFailed, exit_status

#: Command modules, in the order ``keyscope --help`` lists them.
COMMANDS = ("factworld", "similarity", "data", "covariance", "trace", "scan", "edit", "reach", "values", "evaluate", "sequential", "bounds", "reproduce")


class UsageError(KeyscopeError):
    """A command line the parser rejects (unknown option, a count that is not a positive integer, …)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are a :class:`UsageError` (one line from :func:`main`), not a usage
    block and ``SystemExit``; subcommand parsers are of this class too."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from keyscope import __version__

    parser = _Parser(prog="keyscope", description="Keys and values of transformer MLP memories.",
                     epilog="Run 'keyscope COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"keyscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="the command to run")
    for name in COMMANDS:
        importlib.import_module(f"keyscope.cli.{name}").register(sub)
    return parser


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"keyscope: warning: {_one_line(message)}", file=sys.stderr)


def _os_error(exc: OSError) -> str:
    what = exc.strerror or _one_line(exc) or type(exc).__name__
    names = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
    return f"{': '.join(names)}: {what}" if names else what


def _where() -> str:
    """``"rank R of K: "`` in a process ``torchrun`` started, else ``""`` (torch is not imported for that)."""
    if "WORLD_SIZE" not in os.environ:
        return ""
    from keyscope._infra.distributed import from_env

    try:
        world = from_env()
    except ValueError:
        return ""
    return f"rank {world.rank} of {world.size}: " if world.distributed else ""


def _report(exc: BaseException, where: str) -> int | None:
    """Print ``exc`` as the one line of the error contract (``where`` names the rank under torchrun) and return
    the exit status; ``None`` for an unexpected exception of a single process, whose traceback Python prints.
    Under torchrun an unexpected exception prints its traceback, then the line, and is status 1."""
    if isinstance(exc, (KeyscopeError, RankFailed)):
        print(f"keyscope: error: {where}{_one_line(exc)}", file=sys.stderr)
    elif isinstance(exc, OSError):
        print(f"keyscope: error: {where}{_os_error(exc)}", file=sys.stderr)
    elif isinstance(exc, KeyboardInterrupt):
        print(f"keyscope: {where}interrupted", file=sys.stderr)
    elif not where or not isinstance(exc, Exception):
        return None
    else:
        import traceback

        traceback.print_exception(exc)
        print(f"keyscope: error: {where}{type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
    return exit_status(exc)


class _Reported(KeyscopeError):
    """A rank's failure, already printed, on its way out of the process group with its exit status."""

    def __init__(self, exit_code: int):
        super().__init__(f"exit status {exit_code}")
        self.exit_code = exit_code


def _run_checked(args, world) -> int:
    from contextlib import nullcontext

    from keyscope._infra.distributed import check_peers
    from keyscope.cli.common import output_paths
    from keyscope.cli.output import check_outputs, nothing_left_on_failure

    folders, files = output_paths(args)
    check_outputs(folders=folders, files=files)
    # rank 0 alone writes, so it alone cleans up (another rank would remove what rank 0 is writing)
    with nothing_left_on_failure(folders, files) if world.is_main else nullcontext():
        status = int(args.func(args) or 0)
        check_peers(world)  # a rank that failed after the others' last collective fails them here
    return status


def run(args) -> int:
    """Run the parsed command ``args``: check its output paths, then call it; on failure put them back as they were.

    Under ``torchrun`` all of it happens inside the job's process group
    (:func:`keyscope.cli.common.torchrun_world`; :mod:`keyscope._infra.distributed`): the ranks meet once more before
    outputs are kept, so a failure on any rank, however late, fails every rank; each rank prints its error line
    (the failing one its own, the others ``… stopped because rank R of K failed``) after removing what it wrote
    and before any rank exits, and every rank exits with the failing rank's status."""
    from keyscope.cli.common import check_device, resolve_progress, torchrun_world

    resolve_progress(args)  # progress bars on a terminal only, unless --progress or --no-progress
    with torchrun_world(check_device(getattr(args, "device", None))) as (world, _):
        if not world.distributed:
            return _run_checked(args, world)
        try:
            return _run_checked(args, world)
        except BaseException as exc:
            status = _report(exc, f"rank {world.rank} of {world.size}: ")
            if status is None:
                raise
            raise _Reported(status) from None


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores the warning display on return
        warnings.showwarning = _warn
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            if args.command is None:  # plain `keyscope`: the commands, and exit status 0
                parser.print_help()
                return 0
            return run(args)
        except _Reported as exc:
            return exc.exit_code
        except BaseException as exc:
            status = _report(exc, _where())
            if status is None:
                raise
            return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
