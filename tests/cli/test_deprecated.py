"""The old spellings of options kept for one release (issue #27): every one, found by walking the parsers, prints one
line on stderr naming the new spelling and parses to what the new spelling gives; the new spellings print nothing;
neither ``--help`` nor the usage line offers an old spelling; the CLI reference marks them deprecated."""

from __future__ import annotations

import argparse

import pytest

from keyscope.cli import build_parser, main
from keyscope.cli.common import (
    DeprecatedAlias,
    command_parsers,
    deprecation_message,
    non_negative_int,
    positive_int,
)
from keyscope.cli.reference import flag_table, markdown

PARSERS = command_parsers(build_parser())

#: ``(command, old spelling, new spelling)`` of every deprecated alias in the parsers.
DEPRECATED = sorted((name, old, action.new) for name, parser in PARSERS.items() for action in parser._actions
                    if isinstance(action, DeprecatedAlias) for old in action.option_strings)

#: The vocabulary of ``keyscope.cli.common``'s docstring: each must be among the aliases found.
VOCABULARY = {
    *(("--tokens", "--cov-tokens", c) for c in ("similarity", "covariance", "edit", "values", "evaluate", "sequential",
                                                 "bounds")),
    ("--tokens", "--scan-tokens", "scan"), ("--tokens", "--scan-tokens", "reach"),
    ("--top", "--top-k", "reach"), ("--subjects", "--n-subjects", "scan"),
    ("--method", "--methods", "sequential"), ("--method", "--methods", "reach"),
    ("--window", "--mask-window", "scan"), ("--window", "--mask-window", "reach"),
}


def _value(action: argparse.Action) -> str:
    """A value the option takes, other than its default."""
    if action.type in (positive_int, non_negative_int, int):
        return "3"
    if action.dest == "methods":
        return "rome+rep"
    return "x"


def _action(command: str, flag: str) -> argparse.Action:
    return next(a for a in PARSERS[command]._actions if flag in a.option_strings)


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args([*command.split(), *argv])


def test_the_walk_finds_every_deprecated_spelling_of_the_vocabulary():
    assert VOCABULARY <= {(old, new, command) for command, old, new in DEPRECATED}
    assert not any(command == "trace" for command, _, _ in DEPRECATED)  # trace's --window is its own option


@pytest.mark.parametrize("command, old, new", DEPRECATED, ids=[f"{c} {o}" for c, o, _ in DEPRECATED])
def test_an_old_spelling_warns_once_and_parses_as_the_new_one(capsys, command, old, new):
    current = _action(command, new)
    value = _value(current)
    expected = _parse(command, [new, value])
    assert getattr(expected, current.dest) != current.default  # the value shows whether the option was read
    assert capsys.readouterr().err == ""
    parsed = _parse(command, [old, value])
    err = capsys.readouterr()
    assert err.err == deprecation_message(old, new) + "\n" and err.out == ""
    assert err.err == f"keyscope: {old} is deprecated; use {new} (the old spelling goes in the next release)\n"
    assert vars(parsed) == vars(expected)  # every attribute, the option's dest included


@pytest.mark.parametrize("command", sorted({c for c, _, _ in DEPRECATED}))
def test_new_spellings_print_nothing(capsys, command):
    argv = []
    for new in sorted({n for c, _, n in DEPRECATED if c == command}):
        argv += [new, _value(_action(command, new))]
    _parse(command, argv)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command, old, new", DEPRECATED, ids=[f"{c} {o}" for c, o, _ in DEPRECATED])
def test_help_and_usage_do_not_offer_an_old_spelling(command, old, new):
    parser = PARSERS[command]
    alias = _action(command, old)
    assert alias.help == argparse.SUPPRESS and alias.current is _action(command, new)
    assert old not in parser.format_usage().replace("[", " ").replace("]", " ").split()
    options = [line.split()[0] for line in parser.format_help().splitlines() if line.startswith("  --")]
    assert old not in options and new in options


def test_the_reference_marks_old_spellings_deprecated():
    table = flag_table()
    deprecated = table.split("| deprecated | commands | use instead |", 1)[1]
    for old, new, command in VOCABULARY:
        row = next(line for line in deprecated.splitlines() if line.startswith(f"| `{old}` |") and f"`{new}`" in line)
        assert command in row.split(" | ")[1].split(", ")
    canonical = table.split("| deprecated | commands | use instead |", 1)[0]
    assert "| `--tokens` |" not in canonical and "| `--top` |" not in canonical  # no row of their own
    assert "`--scan-tokens` `N` (deprecated: `--tokens`)" in markdown()


def test_main_runs_a_deprecated_spelling_through_the_error_contract(capsys):
    """A bad value under an old spelling: the one error line, naming the spelling typed (the value is refused
    before the option runs, so before its warning)."""
    assert main(["reach", "--top", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("keyscope: error: argument --top: must be at least 1") and len(lines) == 1
