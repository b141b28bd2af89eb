"""The top level of the command line: ``--version``, plain ``keyscope``, an unknown command."""

from __future__ import annotations

import pytest

import keyscope
from keyscope.cli import COMMANDS, main


def test_version_prints_the_one_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"keyscope {keyscope.__version__}"


def test_plain_keyscope_lists_every_command_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"    {name}" in out for name in COMMANDS) and "keyscope COMMAND --help" in out


@pytest.mark.parametrize("argv, message", [(["--verison"], "unrecognized arguments: --verison"),
                                            (["factword"], "invalid choice: 'factword'")])
def test_a_typo_is_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
