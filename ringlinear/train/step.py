"""One optimizer step: forward and backward of every micro-batch, then clipping and the optimizer, without a host
synchronisation anywhere (a read of a device value stalls the CPU until the GPU has drained, and the next step's
kernels are not queued meanwhile).

- The loss is the fused linear + cross-entropy over the fp32 LM head (`return_logits=False`): no [tokens, vocab]
  logits tensor. Its sum over a step's target tokens is divided by the global target count, a device tensor
  (all-reduced over processes, never read on the host), so the result equals one process on the combined batch.
- Statistics (loss and aux-loss sums, gradient norm, MoE load) stay device tensors in the returned dict;
  `to_host` turns them into floats when the loop logs (every --log-every steps).
- Gradient clipping: the global norm and the clip factor are device tensors; `MasterAdamW` applies the factor
  inside its fused update, other optimizers get the gradients scaled in place first.
"""
from __future__ import annotations

import contextlib

import torch

from . import dist as D
from .optim import MasterAdamW, _local


def micro_batches_targets(batches) -> int:
    """Target tokens of a step's micro-batches on this process (collate counts them on the host)."""
    return sum(b["n_targets"] for b in batches)


def token_loss(tr, module, b) -> torch.Tensor:
    """Summed token loss (fp32, fused head + cross-entropy) of micro-batch b through `module` (the model or its
    wrapper); under context parallelism of this process's piece of b."""
    if tr.cp is not None:
        ids, labels, ctx = tr.cp.piece(b)
        return module(ids, ctx=ctx, labels=labels, return_logits=False, loss_reduction="sum").loss
    return module(b["input_ids"], cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"], labels=b["labels"],
                  return_logits=False, loss_reduction="sum").loss


def forward_backward(tr, batches) -> dict:
    """Forward + backward of the micro-batches (gradients left in .grad). `tr`: the Trainer (model `fwd`, DDP
    wrapper, balancer, autocast, env, expert / context parallelism). Returns device-tensor sums: loss, aux,
    targets; host ints: tokens, rows."""
    env = tr.env
    cuda = torch.device(env.device).type == "cuda"  # pinned: a pageable copy would wait for the queued GPU work
    local = torch.tensor([float(micro_batches_targets(batches))], dtype=torch.float64, pin_memory=cuda)
    global_targets = D.all_reduce_sum(env, local.to(env.device, non_blocking=True))[0]
    if tr.cp is not None:  # the ranks of a CP group share their rows: each counted all of them
        global_targets = global_targets / tr.cp.cp
    scale = (env.world / global_targets.clamp_min(1.0)).float()
    aux_scale = env.world / tr.sched_rows.global_rows
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    aux_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    no_sync = getattr(tr.ddp, "no_sync", None)  # DDP only; FSDP2 reduces every micro-batch
    for m, b in enumerate(batches):
        last = m == len(batches) - 1
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            with tr.autocast():
                ce = token_loss(tr, tr.fwd, b)  # fp32 sum
            loss = ce * scale
            aux = tr.balancer.after_forward(b["row_ids"], b["n_rows"])
            if aux is not None:
                loss = loss + aux * aux_scale
                aux_sum += aux.detach().double()
            loss.backward()
        loss_sum += ce.detach().double()
    if tr.ep is not None:
        tr.ep.reduce_grads()
    sums = D.all_reduce_sum(env, torch.stack([loss_sum, aux_sum]))
    return {"loss_sum": sums[0], "aux_sum": sums[1], "targets": global_targets,
            "tokens": tr.sched_rows.global_rows * tr.cfg.seq_len, "rows": tr.sched_rows.global_rows}


def _grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients (DTensor shards reduced over ranks), fp32 device scalar."""
    norms = []
    for p in params:
        n = torch.linalg.vector_norm(p.grad.detach().float())
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def optimizer_step(tr) -> dict:
    """Clip (global norm, device-side factor), step the optimizer and the LR schedule, update the MoE biases."""
    cfg = tr.cfg
    params = [p for p in tr.model.parameters() if p.grad is not None]
    gn = _grad_norm(params)
    coef = None
    if cfg.grad_clip > 0:
        coef = (cfg.grad_clip / (gn + 1e-6)).clamp(max=1.0)
    lr = tr.opt.param_groups[0]["lr"]
    if isinstance(tr.opt, MasterAdamW):
        tr.opt.step(grad_scale=coef)
    else:
        if coef is not None and params:  # local shards: the factor is a plain device scalar
            grads = [_local(p.grad) for p in params]
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        tr.opt.step()
    tr.lr_sched.step()
    tr.opt.zero_grad(set_to_none=True)
    moe = tr.balancer.step(lambda t: D.all_reduce_sum(tr.env, t))
    return {"grad_norm": gn, "lr": lr, **moe}


def to_host(stats: dict) -> dict:
    """Device scalars -> Python floats (one sync for all of them), the rest unchanged."""
    keys = [k for k, v in stats.items() if torch.is_tensor(v)]
    if not keys:
        return dict(stats)
    vals = torch.stack([stats[k].detach().double().reshape(()).to(stats[keys[0]].device) for k in keys]).tolist()
    return {**stats, **dict(zip(keys, vals))}
