"""Context parallelism for training: the packed tokens of a micro-batch split into equal contiguous pieces over
the ranks of a CP group, so one row (or one document) longer than a GPU's memory trains.

Lightning attention (`cp_lightning_attn`). Per head the state recurrence S_t = lam S_{t-1} + k_t^T v_t is linear,
so the state entering rank r's piece is a decayed sum of what the earlier pieces added: with local_j the final
state of rank j's last segment computed from a zero state, and L_m the length of piece m,

    S_in(r) = sum over j < r of  lam^(L_{j+1} + ... + L_{r-1}) * local_j

over the unbroken chain of earlier pieces: the sum stops at the first piece that contains a document start (its
last segment began there) and is empty when a document starts exactly at rank r's first token. Each rank
computes its local final state (one kernel call from zero), the [H, D, D] fp32 states are all-gathered, each rank
forms its own S_in with the weights above (`carry_weights`, fp32; fp64 for fp64 inputs), and recomputes its
output from S_in (a second call with initial_state; later segments of the piece start from zero). Backward: the
kernels' autograd gives dL/d(initial state) and dL/d(final state); the all-gather's backward sums each rank's
state gradient back to its owner: the state gradients travel the ring the other way. Cost: the lightning kernel
twice per layer (attention is a small part of a layer's FLOPs), one all-gather of cp x [H, D, D] fp32.

Softmax layers: each rank all-gathers K and V of the whole micro-batch and attends its queries over their
document's keys up to themselves (the simplest correct causal scheme; memory O(T) for K/V per layer, not
ring attention).

Exactness: with fp64 inputs the result equals the single-process kernel to fp64 rounding; in fp32 the pieces
chunk the sequence from their own starts, so results agree to fp32 rounding (tests/parallel/test_context_parallel.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from ..models.context import AttentionContext, positions_from_cu_seqlens
from ..ops.attention import attention_with_prefix
from ..ops.lightning_attn import lightning_attn
from .comm import all_gather_rows


@dataclass
class Piece:
    """Rank r's tokens [lo, hi) of a packed step."""
    lo: int
    hi: int
    cu: list[int]      # local segment boundaries, 0 .. hi - lo
    doc_start: int     # global start of the document the first segment belongs to
    continues: bool    # the first segment continues a document begun on an earlier rank
    single: bool       # the piece is one segment (no document starts inside it)


def split_pieces(cu: list[int], total: int, cp: int) -> list[Piece]:
    """The cp equal pieces of a packed step of `total` tokens whose documents start at cu[:-1]."""
    if total % cp:
        raise ValueError(f"context parallelism over {cp} ranks needs a token count divisible by {cp}, got {total}")
    L = total // cp
    starts = cu[:-1]
    pieces = []
    for r in range(cp):
        lo, hi = r * L, (r + 1) * L
        inner = [s for s in starts if lo < s < hi]
        doc_start = max(s for s in starts if s <= lo)
        pieces.append(Piece(lo, hi, [0] + [s - lo for s in inner] + [L], doc_start, doc_start < lo, not inner))
    return pieces


def carry_weights(pieces: list[Piece], r: int, g_gamma: torch.Tensor, dtype) -> torch.Tensor:
    """[cp, H]: S_in(r) = sum_j w[j, h] * local_j[h]; lam^n computed as exp(g * n) in `dtype`."""
    g = g_gamma.to(dtype)
    w = torch.zeros(len(pieces), g.shape[0], dtype=dtype, device=g.device)
    if not pieces[r].continues:
        return w
    span = 0
    for j in range(r - 1, -1, -1):
        w[j] = torch.exp(g * span)
        if not (pieces[j].single and pieces[j].continues):
            break  # piece j's last segment started inside it (or at its first token): nothing earlier reaches r
        span += pieces[j].hi - pieces[j].lo
    return w


def cp_lightning_attn(q, k, v, g_gamma, scale, cu_seqlens, carry, group, chunk_size: int = 64):
    """This rank's piece of lightning attention under context parallelism. q, k, v [T_r, H, D] (the piece),
    cu_seqlens [n+1] its local segments (on q's device), carry [cp, H] from `carry_weights`. Returns o
    [T_r, H, D]; differentiable in q, k, v, through the other ranks' pieces too. Collective over `group`."""
    n = cu_seqlens.numel() - 1
    _, fin = lightning_attn(q[None], k[None], v[None], g_gamma, scale=scale, output_final_state=True,
                            cu_seqlens=cu_seqlens, chunk_size=chunk_size)          # [n, H, D, D] from zero
    states = all_gather_rows(fin[-1:], group)                                      # [cp, H, D, D]
    s_in = torch.einsum("jh,jhde->hde", carry.to(states.dtype), states)
    init = torch.cat([s_in[None], states.new_zeros(n - 1, *s_in.shape)]) if n > 1 else s_in[None]
    o, _ = lightning_attn(q[None], k[None], v[None], g_gamma, scale=scale, initial_state=init,
                          cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    return o[0]


def cp_causal_attention(q, k, v, scale, piece: Piece, group):
    """This rank's queries q [T_r, H, D] over the gathered keys of their documents (k, v [T_r, KV, D] local)."""
    K = all_gather_rows(k, group)  # [T, KV, D], rank order = token order
    V = all_gather_rows(v, group)
    out = []
    for i in range(len(piece.cu) - 1):
        s, e = piece.cu[i], piece.cu[i + 1]
        first = piece.doc_start if i == 0 else piece.lo + s
        out.append(attention_with_prefix(q[s:e], K[first:piece.lo + e], V[first:piece.lo + e], scale))
    return torch.cat(out)


class ContextParallelContext(AttentionContext):
    """Attention context of one rank's piece of a packed step (cu: the step's document starts on the host)."""

    def __init__(self, cu: list[int], total: int, group, device, chunk_size: int = 64):
        self.group = group
        self.rank = dist.get_rank(group)
        self.pieces = split_pieces(cu, total, dist.get_world_size(group))
        self.piece = p = self.pieces[self.rank]
        self.cu_seqlens = torch.tensor(p.cu, dtype=torch.int32, device=device)
        offsets = torch.zeros(len(p.cu) - 1, dtype=torch.long)
        offsets[0] = p.lo - p.doc_start
        self.positions = positions_from_cu_seqlens(self.cu_seqlens, offsets.to(device), total=p.hi - p.lo)
        self.chunk_size = chunk_size
        self._carry = {}

    def _carry_for(self, g_gamma, dtype):
        key = (g_gamma.data_ptr(), dtype)  # one per layer: the decays are fixed buffers
        if key not in self._carry:
            self._carry[key] = carry_weights(self.pieces, self.rank, g_gamma, dtype)
        return self._carry[key]

    def linear_attention(self, layer_idx, q, k, v, g_gamma, scale):
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return cp_lightning_attn(q, k, v, g_gamma, scale, self.cu_seqlens, self._carry_for(g_gamma, dtype),
                                 self.group, self.chunk_size)

    def softmax_attention(self, layer_idx, q, k, v, scale):
        return cp_causal_attention(q, k, v, scale, self.piece, self.group)


class ContextParallel:
    """The (dp, cp) mesh of a training run (CP innermost: consecutive ranks) and the slicing of micro-batches."""

    def __init__(self, cp: int, world: int, device_type: str):
        if world % cp:
            raise ValueError(f"--cp {cp} does not divide the {world} processes (world = data-parallel x cp)")
        self.cp, self.dp = cp, world // cp
        self.mesh = init_device_mesh(device_type, (self.dp, cp), mesh_dim_names=("dp", "cp"))
        self.group = self.mesh.get_group("cp")
        self.rank = self.mesh.get_local_rank("cp")

    def piece(self, batch: dict):
        """A collated micro-batch (ringlinear.train.packing.collate) -> this rank's (input_ids [1, T/cp],
        labels [1, T/cp], ContextParallelContext)."""
        ids, labels = batch["input_ids"], batch["labels"]
        T = ids.shape[1]
        ctx = ContextParallelContext(batch["cu_host"], T, self.group, ids.device)
        p = ctx.piece
        return ids[:, p.lo:p.hi], labels[:, p.lo:p.hi], ctx
