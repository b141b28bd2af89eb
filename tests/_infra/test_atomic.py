"""``keyscope._infra.atomic``: a file appears whole or not at all, and a rewrite is a new inode (what lets
``nothing_left_on_failure`` keep the old content by a hard link)."""

from __future__ import annotations

import os

import pytest

from keyscope._infra.atomic import _umask, atomic_write, save_figure, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old")

    def half(tmp):
        with open(tmp, "w") as handle:
            handle.write("half a tab")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["table.csv"]


def test_a_rewrite_is_a_new_inode_and_a_hard_link_keeps_the_old_content(tmp_path):
    path, link = tmp_path / "REPORT.md", tmp_path / "link"
    write_text(path, "old")
    os.link(path, link)
    assert write_text(path, "new") == path
    assert path.read_text() == "new" and link.read_text() == "old"
    assert os.stat(path).st_ino != os.stat(link).st_ino
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())


def test_a_figure_is_saved_in_the_format_of_its_suffix(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    save_figure(figure, tmp_path / "fig.png", dpi=20)
    save_figure(figure, tmp_path / "fig.svg")
    plt.close(figure)
    assert (tmp_path / "fig.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (tmp_path / "fig.svg").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["fig.png", "fig.svg"]
