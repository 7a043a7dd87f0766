"""The examples, for the tests: ``from _examples import EXAMPLES, bank``.

``examples/`` is not a package: its directory goes on ``sys.path`` once, and
``bank`` is imported as the module the example scripts and the CLI load.
"""

import importlib
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
bank: Any = importlib.import_module("bank")
