"""``keyscope.cli.output.nothing_left_on_failure``: a failed (or interrupted) command leaves its ``--out`` folder
and ``--json`` file as they were — what it created removed, what it replaced or removed put back byte for byte —
and its hidden backup folder never survives. The end-to-end case (a real command failing after writing) is
``tests/cli/test_bad_input.py::test_a_failure_after_the_work_leaves_nothing_behind``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keyscope._infra.atomic import save_figure, write_text
from keyscope._infra.errors import KeyscopeError
from keyscope.cli.output import BACKUP_PREFIX, nothing_left_on_failure, write_json

OLD_FIGURE = b"\x89PNG old figure \x00\xff"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def backups(folder: Path) -> list[Path]:
    return sorted(folder.rglob(BACKUP_PREFIX + "*"))


@pytest.fixture
def outputs(tmp_path):
    """An existing ``--out`` folder with a figure, a table and a file of the user's, and an existing ``--json``
    file outside it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "fig3_similarity.png").write_bytes(OLD_FIGURE)
    (out / "table.csv").write_text("a,b\n1,2\n")
    (out / "mine.txt").write_text("keep")
    report = tmp_path / "report.json"
    report.write_text('{"old": true}\n')
    return out, report


def rewrite(out: Path, report: Path) -> None:
    """What a command does before it fails: replace, remove and add outputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    save_figure(figure, out / "fig3_similarity.png", dpi=20)
    plt.close(figure)
    write_text(out / "table.csv", "a,b\n3,4\n")
    (out / "mine.txt").unlink()
    write_text(out / "new.md", "new")
    write_json(str(report), {"new": True})


@pytest.mark.parametrize("exc", [KeyscopeError("stage 2 failed"), OSError(28, "No space left on device"),
                                 KeyboardInterrupt()])
def test_a_failure_puts_replaced_and_removed_files_back_byte_for_byte(outputs, exc):
    out, report = outputs
    before, report_before = snapshot(out), report.read_bytes()
    inode = os.stat(out / "fig3_similarity.png").st_ino
    with pytest.raises(type(exc)), nothing_left_on_failure({"--out": str(out)}, {"--json": str(report)}):
        rewrite(out, report)
        assert (out / "fig3_similarity.png").read_bytes() != OLD_FIGURE  # really overwritten
        assert report.read_text() != '{"old": true}\n'
        raise exc
    assert snapshot(out) == before and report.read_bytes() == report_before
    assert os.stat(out / "fig3_similarity.png").st_ino == inode  # the very file, moved back
    assert not backups(out.parent)


def test_a_success_keeps_the_new_files_and_no_backup(outputs):
    out, report = outputs
    with nothing_left_on_failure({"--out": str(out)}, {"--json": str(report)}):
        rewrite(out, report)
        hidden = backups(out.parent)  # during the run: hidden folders beside the files, holding the old ones
        assert sorted(p.parent for p in hidden) == [out.parent, out]
        (in_out,) = (p for p in hidden if p.parent == out)
        assert (in_out / "fig3_similarity.png").read_bytes() == OLD_FIGURE
    assert sorted(p.name for p in out.iterdir()) == ["fig3_similarity.png", "new.md", "table.csv"]
    assert (out / "table.csv").read_text() == "a,b\n3,4\n" and report.read_text() == '{\n  "new": true\n}\n'
    assert not backups(out.parent)


def test_without_hard_links_the_backup_is_a_copy(outputs, monkeypatch):
    out, report = outputs
    before, report_before = snapshot(out), report.read_bytes()

    def no_link(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(KeyscopeError), nothing_left_on_failure({"--out": str(out)}, {"--json": str(report)}):
        rewrite(out, report)
        raise KeyscopeError("stage 2 failed")
    assert snapshot(out) == before and report.read_bytes() == report_before and not backups(out.parent)


def test_a_json_file_inside_out_is_kept_once_and_new_outputs_go(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), nothing_left_on_failure({"--out": str(out)},
                                                                   {"--json": str(out / "run.json")}):
        write_json(str(out / "run.json"), {"new": 1})
        write_text(out / "fig.png", "new")
        raise KeyboardInterrupt
    assert snapshot(out) == {"run.json": b"old"} and not backups(tmp_path)


def test_new_folders_and_files_are_removed_whole(tmp_path):
    out, report = tmp_path / "a" / "out", tmp_path / "b" / "c" / "report.json"
    with pytest.raises(KeyscopeError), nothing_left_on_failure({"--out": str(out)}, {"--json": str(report)}):
        out.mkdir(parents=True)
        write_text(out / "fig.png", "new")
        write_json(str(report), {"new": 1})
        raise KeyscopeError("late failure")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
