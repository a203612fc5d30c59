"""Pyflakes' checks (ruff's F rules) over the package, the tests and the benchmarks: undefined names, unused
imports and variables. The benchmarks run only on a GPU, so a name used after its `del` (serve_gpu.py printed
`eng.async_scheduling` after `del eng`, 2026-12-02) would otherwise first fail at the end of a timed run."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyflakes_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it is in the dev extras: make install)")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F", "--output-format",
                        "concise", "ringlinear", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
