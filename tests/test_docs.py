"""The documentation builds, warning-free: ``sphinx-build -W`` is part of the test command.

The build runs in a subprocess (Sphinx keeps global state, and autodoc imports
the package afresh) into a temporary directory, and needs no network: the docs
use no intersphinx. Without Sphinx or sphinxcontrib-trio installed (the
``docs`` extra), the test skips with the reason shown; when the ``CI``
environment variable is set it fails instead, because CI must build the docs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: The build takes a few seconds; this only turns a hang into a failure.
BUILD_TIMEOUT = 300


def _missing_docs_tools() -> list[str]:
    return [
        name for name in ("sphinx", "sphinxcontrib_trio") if importlib.util.find_spec(name) is None
    ]


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    missing = _missing_docs_tools()
    if missing:
        reason = f"not installed: {', '.join(missing)} (pip install -e '.[docs]')"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the docs must build, but {reason}")
        pytest.skip(reason)

    env = dict(os.environ)
    env.pop("SPHINXOPTS", None)
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",  # a warning is an error
        "--keep-going",  # ... but report them all
        "-q",  # quiet: only warnings and errors are printed
        "-b",
        "html",
        "-d",
        str(tmp_path / "doctrees"),
        str(DOCS),
        str(tmp_path / "html"),
    ]
    started = time.monotonic()
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, (
        f"sphinx-build failed (exit {result.returncode}, {elapsed:.1f} s):\n"
        f"{result.stderr}\n{result.stdout}"
    )
    assert (tmp_path / "html" / "index.html").is_file()
