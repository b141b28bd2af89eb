"""One vocabulary for every command (issue #27): the canonical flags and the old spellings kept as deprecated
aliases of the same option (their warning: ``test_deprecated.py``), a description, examples and a help text for every option, ``--out`` outside ``figures/``,
``--device`` wherever a model loads, the unknown ``--model`` named before ``--data``, progress bars on a terminal
only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from keyscope.cli import COMMANDS, build_parser, main
from keyscope.cli.common import OUT_ROOT, DeprecatedAlias, command_parsers, resolve_progress
from keyscope.cli.reference import flag_matrix

FACTWORLD_DATA = Path(__file__).resolve().parents[2] / "data" / "factworld" / "factworld.json"


PARSERS = command_parsers(build_parser())

#: The commands that load a model (``data`` does with --model).
MODEL_COMMANDS = ["similarity", "data", "covariance", "trace", "scan", "edit", "reach", "values", "evaluate",
                  "sequential", "bounds", "reproduce", "factworld info", "factworld train"]


def test_every_command_is_walked():
    assert set(COMMANDS) <= set(PARSERS) and {"factworld info", "factworld train"} <= set(PARSERS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_command_has_a_description_examples_and_help_for_every_option(name):
    parser = PARSERS[name]
    assert parser.description and len(parser.description.split()) >= 15, name
    assert parser.epilog.startswith("examples:\n") and f"keyscope {name}" in parser.epilog, name
    text = parser.format_help()
    assert "examples:" in text and f"  keyscope {name}" in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), (name, action.option_strings or action.dest)


def test_the_top_level_lists_the_commands_with_help():
    parser = build_parser()
    assert all(action.help for action in parser._actions if not isinstance(action, argparse._HelpAction))
    assert "similarity" in parser.format_help()


def test_similarity_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["similarity", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:\n  keyscope similarity" in out and "--cov-tokens N " in out
    assert "--tokens" not in out.replace("--cov-tokens", "")  # the deprecated spelling is not offered


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


#: (command, canonical argv, deprecated argv, dest, value): both spellings fill the same dest with the same value
#: (every deprecated spelling, found in the parsers, is checked in ``test_deprecated.py``).
ALIASES = [
    (["similarity"], ["--cov-tokens", "7"], ["--tokens", "7"], "cov_tokens", 7),
    (["edit"], ["--cov-tokens", "7"], ["--tokens", "7"], "cov_tokens", 7),
    (["values"], ["--cov-tokens", "7"], ["--tokens", "7"], "cov_tokens", 7),
    (["evaluate"], ["--cov-tokens", "7"], ["--tokens", "7"], "cov_tokens", 7),
    (["bounds"], ["--cov-tokens", "7"], ["--tokens", "7"], "cov_tokens", 7),
    (["sequential"], ["--cov-tokens", "7"], ["--tokens", "7"], "cov_tokens", 7),
    (["covariance"], ["--cov-tokens", "7"], ["--tokens", "7"], "cov_tokens", 7),
    (["scan"], ["--scan-tokens", "7"], ["--tokens", "7"], "scan_tokens", 7),
    (["reach"], ["--scan-tokens", "7"], ["--tokens", "7"], "scan_tokens", 7),
    (["scan"], ["--n-subjects", "3"], ["--subjects", "3"], "n_subjects", 3),
    (["reach"], ["--top-k", "5"], ["--top", "5"], "top_k", 5),
    (["scan"], ["--mask-window", "4"], ["--window", "4"], "mask_window", 4),
    (["reach"], ["--mask-window", "4"], ["--window", "4"], "mask_window", 4),
    (["sequential"], ["--methods", "rome,memit"], ["--method", "rome,memit"], "methods", "rome,memit"),
    (["reach"], ["--methods", "rome+rep"], ["--method", "rome+rep"], "methods", "rome+rep"),
]


@pytest.mark.parametrize("command, canonical, alias, dest, value", ALIASES,
                         ids=[f"{c[0]} {a[0]}" for c, _, a, _, _ in ALIASES])
def test_an_old_spelling_is_an_alias_of_the_canonical_flag(command, canonical, alias, dest, value):
    assert getattr(parse([*command, *canonical]), dest) == getattr(parse([*command, *alias]), dest) == value


def test_scan_and_reach_keep_tokens_for_the_scanned_tokens_and_c_apart(capsys):
    for command in ("scan", "reach"):
        args = parse([command, "--tokens", "5", "--cov-tokens", "9"])
        assert (args.scan_tokens, args.cov_tokens) == (5, 9)
    args = parse(["bounds", "--tokens", "5", "--scan-tokens", "9"])
    assert (args.cov_tokens, args.scan_tokens) == (5, 9)
    capsys.readouterr()
    assert parse(["trace", "--window", "10"]).window == 10  # trace's --window: ROME's restored layers, no alias
    assert capsys.readouterr().err == ""


def test_one_flag_name_has_one_dest_across_commands():
    """Every canonical flag (an option's first spelling, deprecated ones aside) fills the same dest in every
    command."""
    dests: dict[str, set[str]] = {}
    for parser in PARSERS.values():
        for action in parser._actions:
            if action.option_strings and not isinstance(action, DeprecatedAlias):
                dests.setdefault(action.option_strings[0], set()).add(action.dest)
    assert {flag: d for flag, d in dests.items() if len(d) > 1} == {}
    for flag in ("--cov-tokens", "--scan-tokens", "--top-k", "--n-subjects", "--methods", "--mask-window",
                 "--device", "--seed", "--out", "--json", "--progress", "--no-progress"):
        assert flag in dests, flag
    canonical = {option for p in PARSERS.values() for action in p._actions
                 if action.option_strings and not isinstance(action, DeprecatedAlias) for option in action.option_strings}
    assert not canonical & {"--tokens", "--top", "--subjects", "--method"}  # only ever deprecated aliases


def test_the_flag_table_is_generated_from_the_parsers():
    table = flag_matrix().splitlines()
    assert table[0].startswith("| option | factworld info | factworld train | similarity |")
    rows = {line.split(" | ")[0].strip("| `"): line for line in table[2:]}
    assert "✓ (--tokens, deprecated)" in rows["--cov-tokens"] and "✓ (--tokens, deprecated)" in rows["--scan-tokens"]
    assert "✓ (--top, deprecated)" in rows["--top-k"] and "✓ (--subjects, deprecated)" in rows["--n-subjects"]
    assert "✓ (--method, deprecated)" in rows["--methods"] and "✓ (--window, deprecated)" in rows["--mask-window"]
    assert rows["--window"].count("✓") == 1 and "deprecated" not in rows["--window"]  # trace's alone


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_command_that_loads_a_model_takes_device(name):
    parser = PARSERS[name]
    assert any(a.option_strings == ["--device"] for a in parser._actions)
    path = ["factworld"] if name == "data" else []  # data's one positional
    assert parser.parse_args([*path, "--device", "cpu"]).device == "cpu"


def test_device_defaults_are_unchanged():
    assert all(PARSERS[name].parse_args(["factworld"] if name == "data" else []).device is None
               for name in MODEL_COMMANDS if name != "factworld train")
    assert PARSERS["factworld train"].parse_args([]).device == "cpu"


@pytest.mark.parametrize("device, message", [("tpu", "--device 'tpu'"), ("cuda:x", "is not a device")])
def test_a_bad_device_is_one_line(capsys, device, message):
    assert main(["trace", "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error:") and message in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    assert main(["similarity", "--device", "cuda"]) == 2
    assert "no CUDA device is available here" in capsys.readouterr().err


def test_reach_takes_one_method(capsys, tmp_path):
    assert main(["reach", "--case", "0", "--methods", "rome,rome+rep", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "takes one method, not 2" in err and "\n" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- --out


def test_out_defaults_to_keyscope_out_command_never_figures():
    outs = {name: p.parse_args([]).out for name, p in PARSERS.items()
            if any(a.dest == "out" for a in p._actions) and name != "factworld train"}  # train's --out: the model
    assert set(outs) == {"similarity", "trace", "scan", "reach", "values", "evaluate", "sequential", "bounds",
                         "reproduce"}
    for name, out in outs.items():
        assert out == f"{OUT_ROOT}/{name}" and not Path(out).parts[0] == "figures", name
        assert f"{OUT_ROOT}/{name}/" in PARSERS[name].format_help()


def test_a_run_without_out_writes_under_keyscope_out_in_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(json.loads(FACTWORLD_DATA.read_text())[:40]))
    assert main(["trace", "--data", str(data), "--n", "2", "--samples", "1", "--no-progress"]) == 0
    assert (tmp_path / "keyscope-out" / "trace" / "trace.png").is_file()
    assert "wrote keyscope-out/trace/trace.png" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- --model


@pytest.mark.parametrize("command", [["similarity"], ["trace"], ["scan"], ["values"], ["evaluate"], ["reproduce"],
                                     ["edit", "--case", "0"]], ids=" ".join)
def test_a_misspelt_model_is_named_before_data(tmp_path, capsys, command):
    assert main([*command, "--model", "factword", "--out" if command[0] != "edit" else "--json",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keyscope: error: --model 'factword' is not a model keyscope knows"), err
    assert "(did you mean factworld?)" in err and "--data" in err and "\n" not in err
    assert err.index("factword") < err.index("--data")


def test_a_missing_model_directory_is_named_before_data(tmp_path, capsys):
    assert main(["similarity", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--model {tmp_path / 'nope'}: no such directory or file" in err and "\n" not in err


def test_an_existing_model_without_data_still_asks_for_data(tiny_checkpoints, capsys):
    assert main(["similarity", "--model", str(tiny_checkpoints["gpt2"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "keyscope: error: --data is required for a model other than factworld (a CounterFact/REP JSON file)"


# ---------------------------------------------------------------------------------------------- progress


@pytest.mark.parametrize("flags, tty, shown", [([], True, True), ([], False, False), (["--progress"], False, True),
                                               (["--no-progress"], True, False), (["--progress"], True, True)])
def test_progress_bars_only_on_a_terminal_unless_asked(flags, tty, shown):
    args = parse(["similarity", *flags])
    assert resolve_progress(args, isatty=tty) is shown
    assert args.progress is shown and args.no_progress is (not shown)


def test_progress_and_no_progress_exclude_each_other(capsys):
    assert main(["trace", "--progress", "--no-progress"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_piped_stderr_gets_no_bars_and_progress_forces_them(tmp_path, monkeypatch, capsys):
    """A command run with stderr captured (not a terminal) shows no bar; ``--progress`` shows them."""
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(json.loads(FACTWORLD_DATA.read_text())[:40]))
    argv = ["trace", "--data", str(data), "--n", "2", "--samples", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "\r" not in capsys.readouterr().err
    assert main(argv + ["--progress"]) == 0
    assert "causal trace" in capsys.readouterr().err


def test_factworld_info_says_what_it_does_and_honours_no_progress(monkeypatch, capsys):
    from keyscope.studies import factworld

    calls = []

    def quick(model, progress=False):
        calls.append(progress)
        return {"accuracy": {"canonical": 1.0}, "subjects": 1, "relations": 1, "facts": 1, "layer": 1, "n_layers": 6,
                "tokenizer": "bpe", "subject_tokens": {"median": 4, "words_in_two_or_more_pieces": 0.5},
                "trace": {}, "rome_check": None}

    monkeypatch.setattr(factworld, "info", quick)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)  # as on a terminal
    assert main(["factworld", "info"]) == 0
    assert "measuring the top-1 accuracy of factworld" in capsys.readouterr().err and calls == [True]
    assert main(["factworld", "info", "--no-progress"]) == 0
    assert capsys.readouterr().err == "" and calls[-1] is False
    monkeypatch.undo()
    monkeypatch.setattr(factworld, "info", quick)
    assert main(["factworld", "info"]) == 0  # a piped log: neither bars nor the line
    assert capsys.readouterr().err == "" and calls[-1] is False
    assert main(["factworld", "info", "--progress"]) == 0
    assert "measuring" in capsys.readouterr().err and calls[-1] is True
