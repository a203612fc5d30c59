"""Compile every FP8 kernel for Hopper (sm_90a) without a GPU, through the real launchers, and print a table.

The interpreter runs kernels as numpy and cannot see what only the compiler checks (non-constexpr globals,
layouts, the fp8 wgmma path, shared memory). Here the launchers run on CPU tensors with warmup-only launches
against a stand-in driver that reports an sm_90 target, so each kernel goes through Triton's full pipeline down
to a cubin (Triton's bundled ptxas) exactly as it would be specialised on the H200; nothing executes. A second
`ptxas -v` pass reports registers and spills. Run directly (`python tests/ops/fp8_sm90_compile.py [--all]`) or
through tests/ops/test_fp8_compile.py. Needs TRITON_INTERPRET unset.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

SMEM_LIMIT = 232448   # bytes of shared memory per block on H100/H200 (227 KB)


class _Sm90:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_all(all_shapes=False):
    """-> [(kernel, shared bytes, registers, spill bytes, uses wgmma)] for the FP8 kernels at training shapes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: this compiles real kernels")
    compiled = []

    def getitem(self, grid):
        def launch(*args, **kwargs):
            tier = "@64" if kwargs.get("BLOCK_M") == 64 else ""   # the forward GEMMs' small tier (TG.SMALL_CFG)
            compiled.append((self.fn.__name__ + tier, self.run(*args, grid=grid, warmup=True, **kwargs)))
        return launch

    driver.set_active(_Sm90())
    JITFunction.__getitem__ = getitem
    from ringlinear.ops.fp8 import reference as R
    from ringlinear.ops.fp8 import triton_gemm as TG
    from ringlinear.ops.fp8 import triton_quant as TQ

    c = torch.zeros(1, dtype=torch.int64)
    T = 8192

    def weight(E, N, K):
        return (torch.empty(E, N, K, dtype=R.E4M3), torch.empty(E, N // 128, K // 128),
                torch.empty(E, K, N, dtype=R.E4M3), torch.empty(E, K // 128, N // 128))

    x = torch.empty(T, 2048, dtype=torch.bfloat16)
    TQ.quantize(x, R.E4M3, False, c, rows=True, cols=True)
    TQ.quantize(x, R.E5M2, True, c, rows=True)
    TQ.quantize_weight_into(torch.empty(4, 1024, 2048), *weight(4, 1024, 2048), False, c)
    TQ.rms_norm_quant(x, torch.empty(2048, dtype=torch.bfloat16), 1e-6, False, c, write_y=True, cols=True)
    TQ.swiglu_quant(torch.empty(T, 1024, dtype=torch.bfloat16), False, c, cols=True)
    for tile in TQ.COLS_TILES:  # the launch tiles benchmarks/fp8.py --tiles times
        TQ.rms_norm_quant(x, torch.empty(2048, dtype=torch.bfloat16), 1e-6, False, c, cols=True, cols_tile=tile)
    for tile in TQ.ROWS_TILES:
        TQ.swiglu_quant(torch.empty(T, 1024, dtype=torch.bfloat16), False, c, rows_tile=tile)
    shapes = [(256, 8, 2048, 512)] + ([(256, 8, 4096, 1024), (1, 1, 2048, 5120)] if all_shapes else [])
    for E, k, H, inter in shapes:
        pair, eoff = torch.empty(T * k, dtype=torch.int32), torch.empty(E + 1, dtype=torch.int32)
        TQ.quantize_sorted_cols(x if H == 2048 else torch.empty(T, H, dtype=torch.bfloat16), pair, eoff, k,
                                R.E4M3, False, c, gather=True, wt=torch.empty(T, k))
        xq, xs = torch.empty(T, H, dtype=R.E4M3), torch.empty(H // 128, T)
        w13, w2 = weight(E, 2 * inter, H), weight(E, H, inter)
        ab, (hq, hs), (hqt, hst) = TG.gateup(xq, xs, w13[0], w13[1], pair, eoff, k, torch.bfloat16, True, False, c)
        o = torch.empty(T * k, H, dtype=torch.bfloat16)
        TG.rows_gemm(hq, hs, w2[0], w2[1], pair, eoff, k, o, a_gather=False)
        (gq, gs), _, _ = TG.dswiglu(xq, xs, w2[2], w2[3], ab, torch.empty(T, k) if E > 1 else None, pair, eoff, k,
                                    R.E4M3, False, c)
        TG.rows_gemm(gq, gs, w13[2], w13[3], pair, eoff, k, o, a_gather=False)
        TG.wgrad(torch.empty(H, hqt.shape[1], dtype=R.E4M3), torch.empty(hst.shape[0], H), hqt, hst, eoff,
                 torch.empty(E, H, inter, dtype=torch.bfloat16))
        # a decode step's forward (32 tokens): few rows per expert, the 64-row tier
        nd = 32 * k
        pd = torch.empty(nd, dtype=torch.int32)
        _, (hq, hs), _ = TG.gateup(xq[:32], xs[:, :32], w13[0], w13[1], pd, eoff, k, torch.bfloat16, False, False, c)
        TG.rows_gemm(hq, hs, w2[0], w2[1], pd, eoff, k, torch.empty(nd, H, dtype=torch.bfloat16), a_gather=False)
        TG.rows_gemm(torch.empty(nd, inter, dtype=R.E5M2), hs, w2[0], w2[1], pd, eoff, k,  # dx from e5m2 grads
                     torch.empty(nd, H, dtype=torch.bfloat16), a_gather=False)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, kern in compiled:
            regs = spill = None
            if os.path.exists(ptxas):
                src = os.path.join(d, "k.ptx")
                with open(src, "w") as f:
                    f.write(kern.asm["ptx"])
                err = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                                     capture_output=True, text=True).stderr
                m, s = re.search(r"Used (\d+) registers", err), re.search(r"(\d+) bytes spill stores", err)
                regs, spill = (int(m.group(1)) if m else None), (int(s.group(1)) if s else None)
            rows.append((name, kern.metadata.shared, regs, spill, "warp_group_dot" in kern.asm["ttgir"]))
    return rows


def main():
    rows = compile_all("--all" in sys.argv)
    print(f"{'kernel':<22} {'smem':>7} {'regs':>5} {'spill':>6} wgmma")
    for name, smem, regs, spill, wg in rows:
        print(f"{name:<22} {smem:>7} {regs!s:>5} {spill!s:>6} {wg}")
    bad = [r for r in rows if r[1] > SMEM_LIMIT]
    if bad:
        sys.exit(f"shared memory over the {SMEM_LIMIT}-byte limit: {bad}")


if __name__ == "__main__":
    main()
