"""AdamW step with fp32 master weights, plain PyTorch: the spec of the fused kernel and the CPU path.

Decoupled weight decay and bias correction exactly as torch.optim.AdamW computes them, in fp32:
    w <- w (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
    w <- w - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
g is the parameter's gradient (any float dtype) times `grad_scale` (gradient clipping folded in); `w` is the fp32
master copy (or the parameter itself when it is fp32); the parameter gets w rounded to its dtype.
"""
from __future__ import annotations


def adamw_step(param, grad, master, exp_avg, exp_avg_sq, *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int, grad_scale=None) -> None:
    """In place. param [*] any float dtype; master [*] fp32 or None (param is fp32); exp_avg(_sq) [*] fp32;
    grad_scale: a 0-d fp32 tensor or None."""
    w = master if master is not None else param
    g = grad.float()
    if grad_scale is not None:
        g = g * grad_scale
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    w.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bc2 ** 0.5).add_(eps)
    w.addcdiv_(exp_avg, denom, value=-lr / bc1)
    if master is not None:
        param.copy_(master)
