"""The command-line reference of the docs, generated from the parser (:func:`keyscope.cli.build_parser`).

:func:`markdown` gives one section per command (``factworld info`` and ``factworld train`` each their own): its
help line, its description when it has one, its usage and a table of its arguments with their help and defaults,
then its epilog (examples) when it has one; :func:`flag_table` lists every option name with the commands that take
it and each distinct help text it has there, then every deprecated spelling (kept for one release,
:class:`keyscope.cli.common.DeprecatedAlias`) with the commands that still take it and the option to use instead.
Deprecated spellings never appear as options of their own: in a command's table and in :func:`flag_matrix` they
are marked beside the option they stand for. ``docs/hooks.py`` puts both into ``docs/cli.md`` at build time, so
the reference cannot drift from the parser; ``python -m keyscope.cli.reference`` prints them.
"""

from __future__ import annotations

import argparse
import html
from collections.abc import Iterator

from keyscope.cli.common import DeprecatedAlias, deprecated_aliases

#: The markers of ``docs/cli.md`` that the docs build replaces by :func:`flag_table` and :func:`markdown`.
FLAGS_MARKER = "<!-- generated:cli-flags -->"
REFERENCE_MARKER = "<!-- generated:cli-reference -->"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, help, parser)`` of every command that runs something, depth first in the parser's order
    (``"factworld info"`` for a command of a command)."""
    sub = _subparsers(parser)
    if sub is None:
        return
    helps = {action.dest: action.help or "" for action in sub._choices_actions}
    for name, child in sub.choices.items():
        full = f"{prefix}{name}"
        if _subparsers(child) is None:
            yield full, helps.get(name, ""), child
        else:
            yield from commands(child, f"{full} ")


def _cell(text: object) -> str:
    """``text`` as one markdown table cell: one line, HTML escaped, no bare ``|``."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%" in text:
        try:
            text = text % {**vars(action), "prog": "", "default": action.default}
        except (KeyError, TypeError, ValueError):
            pass
    return text


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{option}`" for option in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    return f"{names} `{metavar}`"


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.required:
        return ""
    return f"`{action.default}`"


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]


def _deprecated(spellings: tuple[str, ...]) -> str:
    """The note beside an option with ``spellings`` kept from earlier versions (``""`` for none)."""
    return f" (deprecated: {', '.join(f'`{old}`' for old in spellings)})" if spellings else ""


def section(name: str, help_line: str, parser: argparse.ArgumentParser, level: int = 2) -> str:
    """One command's section: heading, help line, description, usage, arguments, epilog."""
    lines = [f"{'#' * level} keyscope {name}", ""]
    if help_line:
        lines += [_cell(help_line), ""]
    if parser.description:
        lines += [parser.description.strip(), ""]
    usage = " ".join(parser.format_usage().split())
    lines += ["```text", usage.removeprefix("usage: "), "```", ""]
    arguments = _arguments(parser)
    if arguments:
        lines += ["| argument | help | default |", "|---|---|---|"]
        old = deprecated_aliases(parser)
        lines += [f"| {_name(a)}{_deprecated(old.get(a, ()))} | {_cell(_help(a))} | {_default(a)} |" for a in arguments]
        lines.append("")
    if parser.epilog:
        lines += ["```text", parser.epilog.strip(), "```", ""]
    return "\n".join(lines)


def markdown(parser: argparse.ArgumentParser | None = None, level: int = 2) -> str:
    """Every command's :func:`section`, in the parser's order."""
    if parser is None:
        from keyscope.cli import build_parser

        parser = build_parser()
    return "\n".join(section(name, help_line, child, level) for name, help_line, child in commands(parser))


def flag_table(parser: argparse.ArgumentParser | None = None) -> str:
    """Every option name, the commands that take it and each distinct help text it has (one row per meaning), then
    every deprecated spelling, the commands that take it and the option it stands for there (one row each)."""
    if parser is None:
        from keyscope.cli import build_parser

        parser = build_parser()
    meanings: dict[str, dict[str, list[str]]] = {}
    replaced: dict[tuple[str, str], list[str]] = {}  # (old spelling, new) -> commands
    for name, _, child in commands(parser):
        for action in _arguments(child):
            for option in action.option_strings:
                if option.startswith("--"):
                    meanings.setdefault(option, {}).setdefault(_help(action), []).append(name)
        for action in child._actions:
            if isinstance(action, DeprecatedAlias):
                for old in action.option_strings:
                    replaced.setdefault((old, action.new), []).append(name)
    lines = ["| flag | commands | help |", "|---|---|---|"]
    for option in sorted(meanings):
        for text, names in meanings[option].items():
            lines.append(f"| `{option}` | {', '.join(names)} | {_cell(text) or '—'} |")
    if replaced:
        lines += ["", "Deprecated spellings, kept for one release: each prints a warning on stderr and does what the "
                      "option in its row does; the next release drops them.", "",
                  "| deprecated | commands | use instead |", "|---|---|---|"]
        lines += [f"| `{old}` | {', '.join(names)} | `{new}` |" for (old, new), names in sorted(replaced.items())]
    return "\n".join(lines) + "\n"


#: The shared options of :func:`flag_matrix`, in its row order.
SHARED_FLAGS = ("--model", "--data", "--known", "--layer", "--dtype", "--device", "--corpus", "--cov-tokens",
                "--scan-tokens", "--recompute", "--n", "--n-subjects", "--top-k", "--methods", "--mask-window",
                "--window", "--seed", "--out", "--json", "--progress", "--no-progress")


def flag_matrix(parser=None) -> str:
    """A Markdown table of the shared options (:data:`SHARED_FLAGS`) × the commands, generated from the parsers: a
    cell is ``✓`` where the command takes the option, plus its deprecated spellings there (kept from earlier
    versions for one release) in brackets, empty where it does not."""
    if parser is None:
        from keyscope.cli import build_parser

        parser = build_parser()
    from keyscope.cli.common import command_parsers

    commands = {name: p for name, p in command_parsers(parser).items() if name != "factworld"}
    lines = ["| option | " + " | ".join(commands) + " |", "|---" * (len(commands) + 1) + "|"]
    for flag in SHARED_FLAGS:
        cells = []
        for sub in commands.values():
            action = next((a for a in sub._actions if a.option_strings and a.option_strings[0] == flag
                           and not isinstance(a, DeprecatedAlias)), None)
            old = deprecated_aliases(sub).get(action, ()) if action is not None else ()
            cells.append("" if action is None else "✓" + "".join(f" ({alias}, deprecated)" for alias in old))
        lines.append(f"| `{flag}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m keyscope.cli.reference
    print(flag_table())
    print(markdown())
