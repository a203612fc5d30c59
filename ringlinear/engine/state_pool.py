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
    """open_chunk = (rows, dtype) for numerics="aligned": the states are then those at each request's last chunk
    boundary, and `open_k` / `open_v` [num_slots + 1, rows, H, D] hold the k, v of its open chunk
    (ringlinear/ops/lightning_attn/aligned.py)."""

    def __init__(self, linear_layers: list[int], num_slots: int, num_heads: int, head_dim: int, device,
                 open_chunk: tuple[int, torch.dtype] | None = None):
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        self._shape, self._device = (num_slots + 1, num_heads, head_dim, head_dim), device
        self._open_shape = None if open_chunk is None else (num_slots + 1, open_chunk[0], num_heads, head_dim)
        self._open_dtype = None if open_chunk is None else open_chunk[1]
        self._layers = list(linear_layers)
        self.states: dict[int, torch.Tensor] = {}
        self.open_k: dict[int, torch.Tensor] = {}
        self.open_v: dict[int, torch.Tensor] = {}
        self.make_storage()
        self.slots = FreeList(num_slots, "linear-state slot")

    def make_storage(self) -> None:
        """(Re-)create the state tensors (after `free_storage`); slots are zeroed when handed out anyway."""
        self.states = {i: torch.zeros(self._shape, dtype=torch.float32, device=self._device) for i in self._layers}
        if self._open_shape is not None:
            kw = dict(dtype=self._open_dtype, device=self._device)
            self.open_k = {i: torch.zeros(self._open_shape, **kw) for i in self._layers}
            self.open_v = {i: torch.zeros(self._open_shape, **kw) for i in self._layers}

    def free_storage(self) -> None:
        """Drop the state tensors (RL's training phase); every slot must be free."""
        if self.slots.num_free != self.num_slots:
            raise RuntimeError("free_storage with state slots still in use")
        self.states, self.open_k, self.open_v = {}, {}, {}

    @property
    def num_free(self) -> int:
        return self.slots.num_free

    def allocate(self) -> int:
        slot = self.slots.allocate(1)[0]
        self.zero(slot)
        return slot

    def zero(self, slot: int) -> None:
        """Zero slot's state in every layer: one multi-tensor kernel on CUDA, not one launch per layer."""
        if self.states:  # a model without linear layers has no states
            torch._foreach_zero_([t[slot] for t in self.states.values()])

    def fork(self, src: int) -> int:
        """A new slot holding a copy of slot src's state (and open chunk): a forked request continues from it."""
        slot = self.slots.allocate(1)[0]
        for d in (self.states, self.open_k, self.open_v):
            for t in d.values():
                t[slot].copy_(t[src])
        return slot

    def free(self, slot: int) -> None:
        self.slots.free([slot])

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.states, self.open_k, self.open_v) for t in d.values())
