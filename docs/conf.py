"""Sphinx configuration for the trio_aggregates documentation.

Built with ``-W`` (warnings are errors) by ``tests/test_docs.py``. No
intersphinx: the build machine has no internet access.
"""

from __future__ import annotations

import os
import sys

# autodoc imports the package from the repository root (no install needed).
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import trio_aggregates  # noqa: E402

project = "trio_aggregates"
author = "the trio_aggregates authors"
copyright = "the trio_aggregates authors"  # noqa: A001
release = trio_aggregates.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
]

# Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = False
autodoc_inherit_docstrings = False

default_role = "py:obj"
nitpicky = False
primary_domain = "py"
default_domain = "py"

templates_path: list[str] = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"trio_aggregates {release}"
napoleon_use_ivar = False
