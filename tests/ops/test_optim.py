"""AdamW with fp32 master weights: the reference equals torch.optim.AdamW on fp32 parameters (bitwise), the fused
kernel (interpreter on CPU) equals the reference within fp32 rounding, bf16 parameters keep their fp32 masters,
and the optimizer's state survives a save/load without being rounded."""
import pytest
import torch

from ringlinear.ops.optim import reference as R
from ringlinear.train.optim import MasterAdamW

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HP = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _tensors(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


def test_reference_equals_torch_adamw_bitwise():
    p, _ = _tensors(1000, 0)
    ours, m, v = p.clone(), torch.zeros(1000), torch.zeros(1000)
    theirs = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([theirs], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False)
    for step in range(1, 4):
        _, g = _tensors(1000, step)
        theirs.grad = g.clone()
        opt.step()
        R.adamw_step(ours, g, None, m, v, step=step, **HP)
    assert torch.equal(ours, theirs.detach())


def test_kernel_matches_reference():
    pytest.importorskip("triton")
    from ringlinear.ops.optim import triton as T
    p, g = _tensors(10000, 1)
    w = p.clone().to(DEV)
    a = [w.clone().to(torch.bfloat16), w.clone(), torch.zeros_like(w), torch.zeros_like(w)]
    b = [w.clone().to(torch.bfloat16), w.clone(), torch.zeros_like(w), torch.zeros_like(w)]
    scale = torch.tensor(0.5, device=DEV)
    for step in (1, 2):
        gg = (g * step).to(DEV, torch.bfloat16)
        T.adamw_step(a[0], gg, a[1], a[2], a[3], step=step, grad_scale=scale, **HP)
        R.adamw_step(b[0], gg, b[1], b[2], b[3], step=step, grad_scale=scale, **HP)
    for x, y in zip(a[1:], b[1:]):
        assert float((x - y).abs().max() / y.abs().max()) < 1e-6
    assert torch.equal(a[0], a[1].to(torch.bfloat16))  # the parameter is its master rounded


def test_bf16_params_keep_fp32_masters_through_save_and_load():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, bias=False).to(DEV, torch.bfloat16)
    opt = MasterAdamW(lin.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    lin.weight.grad = torch.randn(8, 8, device=DEV).to(torch.bfloat16)
    before = lin.weight.detach().clone()
    opt.step()
    st = opt.state[lin.weight]
    assert st["master"].dtype == st["exp_avg"].dtype == torch.float32
    # an update far below a bf16 ulp still moves the master weight
    assert not torch.equal(st["master"], before.float())
    saved = opt.state_dict()
    opt2 = MasterAdamW(lin.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    opt2.load_state_dict(saved)
    st2 = opt2.state[lin.weight]
    for k in ("master", "exp_avg", "exp_avg_sq"):
        assert st2[k].dtype == torch.float32 and torch.equal(st2[k], st[k])
