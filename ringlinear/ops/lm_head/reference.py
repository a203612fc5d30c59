"""fp32 LM head: model-dtype inputs, fp32 accumulation and output (log-prob fidelity, docs/numerics.md)."""
from __future__ import annotations

import torch.nn.functional as F


def lm_head_fp32(x, weight):
    """x [N, h], weight [V, h] -> logits [N, V] fp32."""
    return F.linear(x.float(), weight.float())
