"""Linear-attention state slots: one fp32 [H, D, D] state per linear layer per running request.

`states[layer]` is a pool [num_slots + 1, H, D, D] fp32 (never lower precision: docs/numerics.md) that the lightning
ops update in place by slot id. A slot is zeroed when handed out, because a fresh request starts from the zero
state and a recomputed (preempted) request starts over. The extra last slot is a scratch target for padded
CUDA-graph rows and is never handed out.
"""
from __future__ import annotations

import torch

from .free_list import FreeList


class StatePool:
    def __init__(self, linear_layers: list[int], num_slots: int, num_heads: int, head_dim: int, device):
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        shape = (num_slots + 1, num_heads, head_dim, head_dim)
        self.states = {i: torch.zeros(shape, dtype=torch.float32, device=device) for i in linear_layers}
        self.slots = FreeList(num_slots, "linear-state slot")

    @property
    def num_free(self) -> int:
        return self.slots.num_free

    def allocate(self) -> int:
        slot = self.slots.allocate(1)[0]
        for t in self.states.values():
            t[slot].zero_()
        return slot

    def free(self, slot: int) -> None:
        self.slots.free([slot])

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())
