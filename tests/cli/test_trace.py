from __future__ import annotations

import json
from pathlib import Path

from keyscope.cli import main

FACTWORLD_DATA = Path(__file__).resolve().parents[2] / "data" / "factworld" / "factworld.json"


def test_trace_json_has_the_profile_and_the_layer(tmp_path, capsys):
    out, report, data = tmp_path / "out", tmp_path / "trace.json", tmp_path / "facts.json"
    data.write_text(json.dumps(json.loads(FACTWORLD_DATA.read_text())[:40]))
    argv = ["trace", "--data", str(data), "--n", "3", "--samples", "2", "--no-progress", "--out", str(out),
            "--json", str(report)]
    assert main(argv) == 0
    data = json.loads(report.read_text())
    assert data["n_known"] <= 40
    assert len(data["indirect_effect"]["mlp"]) == len(data["indirect_effect"]["attn"]) == data["n_layers"]
    assert 0 <= data["layer"] < data["n_layers"] and data["n"] == 3
    assert (out / "trace.png").is_file() and (out / "trace.csv").is_file()
    assert "<- edit layer" in capsys.readouterr().out


def test_trace_bad_input_fails_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        ["--n", "0"],
        ["--noise", "nan"],
        ["--case", "no-such-case", "--out", str(tmp_path / "o1")],
        ["--out", str(afile)],
        ["--json", str(tmp_path)],
    ]
    for extra in cases:
        assert main(["trace", "--no-progress", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("keyscope: error:"), (extra, err)
    assert not (tmp_path / "o1").exists()
