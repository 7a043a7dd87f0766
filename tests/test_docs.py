"""The documentation builds, warning-free: ``sphinx-build -W`` is part of the test command.

The build runs in a subprocess (Sphinx keeps global state, and autodoc imports
the package afresh) into a temporary directory, and needs no network: the docs
use no intersphinx and no remote assets. The pictures are drawn at build time
by Graphviz's ``dot``. Without Sphinx, sphinxcontrib-trio or furo installed
(the ``docs`` extra), or without ``dot`` on the PATH (Debian's ``graphviz``
package, which ``.ci/run`` installs), the test skips with the reason shown;
when the ``CI`` environment variable is set it fails instead, because CI must
build the docs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
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
    missing = [
        f"{name} (pip install -e '.[docs]')"
        for name in ("sphinx", "sphinxcontrib_trio", "furo")
        if importlib.util.find_spec(name) is None
    ]
    if shutil.which("dot") is None:
        missing.append("Graphviz's dot (apt-get install graphviz)")
    return missing


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    missing = _missing_docs_tools()
    if missing:
        reason = f"not installed: {', '.join(missing)}"
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

    # The pictures were drawn (SVG files from dot), and every plot the
    # performance page shows exists.
    html = tmp_path / "html"
    design = (html / "design.html").read_text(encoding="utf-8")
    drawn = re.findall(r'<object data="(_images/graphviz-[0-9a-f]+\.svg)"', design)
    assert len(drawn) >= 3, (
        "design.html should show the task tree, a command's path and the lifecycle"
    )
    for name in drawn:
        svg = (html / name).read_text(encoding="utf-8")
        assert "<svg" in svg and "</svg>" in svg, name
    benchmarks = (html / "benchmarks.html").read_text(encoding="utf-8")
    plots = re.findall(r'src="(_images/[^"]+\.svg)"', benchmarks)
    assert len(plots) >= 4, plots
    for name in plots:
        assert (html / name).stat().st_size > 1000, name
