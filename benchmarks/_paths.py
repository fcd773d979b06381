"""Where benchmarks find the repository, write their results, and which Python runs workers."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
BUILD = RESULTS / ".build"
PYTHON = sys.executable  # an absolute interpreter path: `python3` on PATH may be a shim
