"""Runs an experiment's CI configuration as a real subprocess (tests/test_experiments_*.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_quick(name: str, out: Path) -> dict:
    """``experiments/<name>.py --quick --seeds 1 --out <out>`` on one thread; its results.json."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--seeds", "1",
         "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())
