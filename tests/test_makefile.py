"""`make install` asks for the CPU build of torch by name: plain `torch==X` takes PyPI's CUDA build (several GB)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_install_takes_the_cpu_wheel_explicitly():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "-n", "install"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pip_lines = [line for line in dry.splitlines() if "pip install" in line and "torch==" in line]
    assert pip_lines and all("+cpu" in line for line in pip_lines), dry  # the local label picks the CPU build
    assert any("--extra-index-url https://download.pytorch.org/whl/cpu" in line for line in pip_lines), dry
    assert dry.index("torch==") < dry.index('install -q -e ".[dev]"')  # torch before the package pulls one in
