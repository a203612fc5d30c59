"""On a GPU: the bf16 training path (bf16 parameters, fp32 master AdamW, fused kernels and loss, flash varlen
attention) follows the fp32 CPU loss curve of the tiny preset over its first 50 steps, from the same weights.

Tolerance: bf16 rounds every activation and weight to 8 mantissa bits, so the two curves drift apart slowly; the
mean relative difference of the per-step losses must stay under 2% and the largest under 5%."""
import pytest
import torch

from ringlinear.testing import make_tiny_checkpoint
from ringlinear.train import train
from ringlinear.train.report import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compares the GPU bf16 path)")


def test_bf16_gpu_loss_curve_follows_fp32_cpu(tiny_cfg, tmp_path):
    init = make_tiny_checkpoint(str(tmp_path / "init"))
    curves = {}
    for name, device, precision in (("cpu", "cpu", "fp32"), ("gpu", "cuda", "bf16")):
        cfg = tiny_cfg(tmp_path / name, init_from=init, device=device, precision=precision, steps=50,
                       eval_every=0, save_every=0, log_every=10)
        train(cfg)
        curves[name] = [m["loss"] for m in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in m]
    a, b = torch.tensor(curves["cpu"]), torch.tensor(curves["gpu"])
    assert a.numel() == b.numel() == 50
    rel = (a - b).abs() / a
    print(f"bf16 GPU vs fp32 CPU: mean rel {float(rel.mean()):.4f}, max rel {float(rel.max()):.4f}")
    assert float(rel.mean()) < 0.02 and float(rel.max()) < 0.05
