"""Sphinx configuration for the trio_aggregates documentation.

Build: ``.venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html``
(``tests/test_docs.py`` runs the same build, so warnings fail the tests). No
intersphinx: the build machine has no internet access, so references to Trio
and the standard library are plain text, not links.
"""

from __future__ import annotations

import os
import sys

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

# -- HTML -------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"trio_aggregates {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "A nursery-owning aggregate registry for Trio",
    "fixed_sidebar": True,
}
