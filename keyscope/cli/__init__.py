"""The ``keyscope`` command line: a thin shell over library functions.

``main(argv) -> int`` is the one place that turns every expected failure into one line on stderr and exit
status 2, with no traceback: a bad argument (``keyscope: error: argument --n: …``), a
:class:`~keyscope.errors.KeyscopeError`, and an :class:`OSError` (an output path that cannot be written, a
full disk). Before a command runs, its output paths (``--out``, ``--json``, ``--export``) are checked; if it
fails, they are put back as they were: what it had written there is removed, and the files that were there
before come back with their old content (:func:`keyscope.cli.output.nothing_left_on_failure`). Library
warnings print as one ``keyscope: warning: …`` line each; Ctrl-C prints ``keyscope: interrupted`` and exits
130. Each command lives in its own module here and registers its subparser through ``register(sub)``; no
library module imports this package.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from keyscope.errors import KeyscopeError

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

    parser = _Parser(prog="keyscope", description="Keys and values of transformer MLP memories.")
    sub = parser.add_subparsers(dest="command", required=True)
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


def run(args) -> int:
    """Run the parsed command ``args``: check its output paths, then call it; on failure put them back as they were."""
    from keyscope.cli.common import output_paths
    from keyscope.cli.output import check_outputs, nothing_left_on_failure

    folders, files = output_paths(args)
    check_outputs(folders=folders, files=files)
    with nothing_left_on_failure(folders, files):
        return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores the warning display on return
        warnings.showwarning = _warn
        try:
            return run(build_parser().parse_args(argv))
        except KeyscopeError as exc:
            print(f"keyscope: error: {_one_line(exc)}", file=sys.stderr)
            return exc.exit_code
        except OSError as exc:
            print(f"keyscope: error: {_os_error(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("keyscope: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
