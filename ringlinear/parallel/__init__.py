"""Parallelism beyond data parallel, on torch.distributed (gloo on CPU, nccl on CUDA): docs/parallel.md.

- `comm`: the differentiable collectives (all-to-all by split sizes, all-gather of equal pieces) and the fixed-order
  inference sum
- `expert`: expert parallelism for training (experts split over an EP group, all-to-all dispatch and combine)
- `context`: context parallelism for training (a packed step split over a CP group; lightning states carried
  along the group, softmax K/V gathered)
- `tensor`: tensor and expert parallelism for serving (heads and dense layers split, experts by owner)

Importing this package loads torch.distributed only; nothing here starts processes (the serving engine's
multi-rank driver is ringlinear/engine/distributed.py, the trainer's is torchrun).
"""
