"""Every FP8 kernel compiles for Hopper (sm_90a) at training shapes without a GPU, its fp8 dots lower to wgmma,
and it fits in shared memory (tests/ops/fp8_sm90_compile.py, in a subprocess: the interpreter must be off)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")


def test_fp8_kernels_compile_for_sm90():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the other FP8 tests compile and run the kernels for the real card")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "fp8_sm90_compile.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:] if line.strip()}
    for k in ("_gateup_kernel", "_rows_kernel", "_dswiglu_kernel", "_wgrad_kernel", "_gateup_kernel@64",
              "_rows_kernel@64"):
        assert table[k][-1] == "True", f"{k} does not use wgmma:\n{out.stdout}"
    for k in ("_quant_kernel", "_weight_kernel", "_rms_rows_kernel", "_rms_cols_kernel", "_swiglu_kernel",
              "_sorted_cols_kernel"):
        assert k in table, out.stdout
