"""The README and the docs site: the README's length, its Python block and the API page's run as written, the
command-line reference is generated from the parser, and the site builds with warnings as errors."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from keyscope.cli import build_parser, reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_readme_is_short_and_points_to_the_docs():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link
    assert "arxiv.org/abs/2410.09338" in text and "@inproceedings{" in text


def test_the_readme_example_is_the_one_the_docs_show():
    (example,) = _python_blocks(README)
    assert example in _python_blocks(DOCS / "quickstart.md")
    assert example == _python_blocks(DOCS / "api.md")[0]


@pytest.mark.slow
@pytest.mark.parametrize("block, shown", [(0, "Antarctica"), (1, "Antarctica"), (2, "Antarctica"), (3, "rephrase")],
                         ids=["readme", "rome+rep", "edit", "study"])
def test_python_blocks_run_as_written(block, shown, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEYSCOPE_CACHE", str(tmp_path / "cache"))  # C computed afresh, never the user's cache
    code = _python_blocks(DOCS / "api.md")[block]
    exec(compile(code, f"docs/api.md block {block}", "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    assert shown in printed  # the edited fact's new target, generated with the edit applied (the study: its table)


def test_cli_reference_has_a_section_per_command():
    parser = build_parser()
    names = [name for name, _, _ in reference.commands(parser)]
    assert "similarity" in names and "factworld train" in names and "factworld" not in names
    text = reference.markdown(parser)
    for name, _, child in reference.commands(parser):
        section = text.split(f"## keyscope {name}\n", 1)[1].split("\n## keyscope ", 1)[0]
        assert "```text\n" + " ".join(child.format_usage().split()).removeprefix("usage: ") in section
        for action in reference._arguments(child):  # every argument but --help
            for option in action.option_strings:
                assert f"`{option}`" in section, (name, option)
    flags = reference.flag_table(parser)
    assert "| `--json` |" in flags and "| `--out` |" in flags


def test_cli_page_has_the_generated_markers():
    text = (DOCS / "cli.md").read_text()
    assert reference.FLAGS_MARKER in text and reference.REFERENCE_MARKER in text


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="the docs extra is not installed")
def test_site_builds_strict(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "figures" / "fig3_similarity.png").is_file()
    cli = (site / "cli" / "index.html").read_text()
    assert "keyscope similarity" in cli and "--n-subjects" in cli
    assert "keyscope.editing.rome" in (site / "api" / "index.html").read_text()
