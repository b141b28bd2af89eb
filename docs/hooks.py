"""MkDocs hooks of the keyscope docs (``mkdocs.yml``: ``hooks: [docs/hooks.py]``).

* **figures**: every file under the repository's ``figures/`` joins the site at ``figures/`` (read from where it
  is, never copied into ``docs/``), so the pages show the committed figures and link to the artefacts. A page links
  to them as ``../figures/NAME`` (the path from ``docs/`` in the repository, which GitHub shows too); the hook
  rewrites that to ``figures/NAME`` before MkDocs checks the links.
* **command-line reference**: ``docs/cli.md``'s markers are replaced by the reference and the table of flags that
  :mod:`keyscope.cli.reference` generates from ``keyscope.cli.build_parser()``.
* **docstring roles**: Sphinx roles left in docstrings (``:class:`~keyscope.rome.ROMEConfig``` …) are shown as
  code, the name without its role.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"

_FIGURE_LINK = re.compile(r"(\]\(|src=\")\.\./figures/")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):<code>~?([^<]*)</code>")


def on_files(files, config):
    for path in sorted(p for p in FIGURES.rglob("*") if p.is_file()):
        uri = f"figures/{path.relative_to(FIGURES).as_posix()}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if not page.file.src_uri.startswith("figures/"):
        depth = page.file.src_uri.count("/")
        markdown = _FIGURE_LINK.sub(lambda m: m[1] + "../" * depth + "figures/", markdown)
    if page.file.src_uri == "cli.md":
        from keyscope.cli import reference

        markdown = (markdown.replace(reference.FLAGS_MARKER, reference.flag_table())
                    .replace(reference.REFERENCE_MARKER, reference.markdown(level=3)))
    return markdown


def on_page_content(html, page, config, files):
    return _ROLE.sub(lambda m: f"<code>{m[1]}</code>", html)
