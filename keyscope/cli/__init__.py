"""The ``keyscope`` command line: a thin shell over library functions.

``main(argv) -> int`` parses, calls the library, prints, and turns every :class:`~keyscope.errors.KeyscopeError`
into one line on stderr and exit status 2 (no traceback). Each command lives in its own module here and
registers its subparser through ``register(sub)``; no library module imports this package.
"""

from __future__ import annotations

import argparse
import sys

from keyscope.errors import KeyscopeError

#: Command modules, in the order ``keyscope --help`` lists them.
COMMANDS = ("factworld", "similarity", "data", "trace", "scan", "edit", "values", "evaluate", "sequential", "bounds", "reproduce")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="keyscope", description="Keys and values of transformer MLP memories.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"keyscope.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyscopeError as exc:
        print(f"keyscope: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("keyscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
