"""Sphinx configuration for the trio_aggregates documentation.

Build: ``.venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html``
(``tests/test_docs.py`` runs the same build, so warnings fail the tests). No
network at build time: no intersphinx (references to Trio and the standard
library are plain text, not links), and no remote assets (furo uses the
system's fonts; the diagrams are drawn by the local Graphviz ``dot``; the
benchmark plots are committed SVG files in ``_static/plots``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

# autodoc imports the package from the repository root: no install needed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import trio_aggregates

try:  # the PostgreSQL store's module imports psycopg (the "postgres" extra)
    import psycopg  # noqa: F401
except ImportError:
    autodoc_mock_imports = ["psycopg"]

project = "trio_aggregates"
author = "the trio_aggregates authors"
project_copyright = "the trio_aggregates authors"
release = trio_aggregates.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.graphviz",
    "sphinxcontrib_trio",
]

nitpicky = False
default_role = "py:obj"
primary_domain = "py"
exclude_patterns = ["_build"]
templates_path: list[str] = []

# -- autodoc ----------------------------------------------------------------

# Types go next to the documented parameters, not into the signatures: the
# signatures stay readable (``async with open_registry(...) as registry``).
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False

# -- napoleon (Google style only) -------------------------------------------

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
# "Attributes:" sections become field lists, not separate ``attribute``
# objects: several records have an attribute named ``type``, and as objects
# they make every ``type[...]`` annotation an ambiguous cross-reference.
napoleon_use_ivar = True

# -- graphviz ---------------------------------------------------------------

# The pictures (task tree, a command's path, an activation's lifecycle) are
# ``.. graphviz::`` blocks drawn at build time by Graphviz's ``dot``, so they
# change with the text beside them. SVG keeps them sharp and their text
# searchable; a white background keeps them readable in furo's dark mode.
graphviz_output_format = "svg"
graphviz_dot_args = [
    "-Gbgcolor=white",
    "-Gfontname=DejaVu Sans",
    "-Nfontname=DejaVu Sans",
    "-Efontname=DejaVu Sans",
    "-Gfontsize=11",
    "-Nfontsize=11",
    "-Efontsize=10",
]

# -- HTML -------------------------------------------------------------------

html_theme = "furo"
html_title = f"trio_aggregates {release}"
html_static_path = ["_static"]
# A wider reading column: code lines of 100 characters fit at 1280 px.
html_css_files = ["custom.css"]
html_theme_options = {
    "navigation_with_keys": True,
    "top_of_page_buttons": [],
}
pygments_style = "friendly"
pygments_dark_style = "monokai"


# -- Markdown pages ------------------------------------------------------------

#: Pages whose text is a Markdown file of the repository, converted to
#: reStructuredText when Sphinx reads them (the ``.rst`` file is a stub).
#: The converter knows the little Markdown those files use (headings,
#: paragraphs, ``-`` lists, fenced code, pipe tables, inline code, bold,
#: links), so the site needs no Markdown parser.
MARKDOWN_PAGES = {"changelog": "CHANGELOG.md", "contributing": "CONTRIBUTING.md"}

_ROOT = Path(__file__).resolve().parent.parent


def _inline(text: str) -> str:
    """Markdown inline markup as reStructuredText (code spans may cross lines)."""
    parts = re.split(r"(`[^`]+`)", text)
    for n in range(0, len(parts), 2):  # the text between code spans
        parts[n] = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"`\1 <\2>`__", parts[n])
    for n in range(1, len(parts), 2):
        # Inline markup must be set off by spaces or punctuation: escape the rest.
        before = "\\ " if parts[n - 1][-1:].isalnum() else ""
        after = "\\ " if parts[n + 1][:1].isalnum() else ""
        parts[n] = f"{before}``{parts[n][1:-1]}``{after}"
    return "".join(parts)


def markdown_to_rst(text: str) -> str:
    """The Markdown of ``CHANGELOG.md`` and ``CONTRIBUTING.md`` as reStructuredText."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if out and out[-1] and re.match(r"```|#{1,4} |\|", line):
            out.append("")  # a block starts: reStructuredText wants a blank line first
        if line.startswith("```"):
            language = {"sh": "shell", "": "text"}.get(line[3:].strip(), line[3:].strip())
            out += [f".. code-block:: {language}", ""]
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                out.append(f"   {lines[i]}" if lines[i] else "")
                i += 1
            out.append("")
            i += 1
        elif heading := re.match(r"(#{1,4}) (.*)", line):
            title = _inline(heading[2])
            out += [title, "=-~^"[len(heading[1]) - 1] * len(title), ""]
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= set("-: ") for c in cells):
                    rows.append(cells)
                i += 1
            out += [".. list-table::", "   :header-rows: 1", ""]
            for row in rows:
                for n, cell in enumerate(row):
                    out.append(f"   {'*' if n == 0 else ' '} - {_inline(cell) or ' '}")
            out.append("")
        else:  # a run of plain lines: a paragraph, or list items
            block = []
            while i < len(lines) and lines[i] and not re.match(r"```|#{1,4} |\|", lines[i]):
                block.append(lines[i])
                i += 1
            if block:
                out += _inline("\n".join(block)).split("\n")
            else:
                out.append("")
                i += 1
    return "\n".join(out) + "\n"


def _read_markdown_page(app: Any, docname: str, source: list[str]) -> None:
    name = MARKDOWN_PAGES.get(docname)
    if name is None:
        return
    path = _ROOT / name
    app.env.note_dependency(str(path))
    source[0] = markdown_to_rst(path.read_text(encoding="utf-8"))


def setup(app: Any) -> None:
    app.connect("source-read", _read_markdown_page)
