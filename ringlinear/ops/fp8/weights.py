"""FP8 copies of the weights (128x128 blocks, both orientations), made once per optimizer step and cached.

Caching across forward calls (gradient accumulation, activation-checkpoint recomputation) is only safe when the
cache learns about every weight update. In-place updates bump a tensor's version counter, but the fused AdamW
kernel (the trainer's CUDA default) and writes through `.data` do not. So the cache is off until an optimizer is
tracked (`track_optimizer(opt)`: a post-step hook calls `weights_updated()`); then an entry is valid while both the
update generation and its base tensor's version counter are unchanged. Without tracking every call quantises
afresh (correct, one extra pass over the weights per forward and per recomputation).
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .precision import nonfinite_counter
from .reference import E4M3, TILE, check_dims, quantize_weight

_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
_state = {"generation": 0, "tracked": 0}


def weights_updated() -> None:
    """Invalidate every cached FP8 weight (call after each optimizer step if the optimizer is not tracked)."""
    _state["generation"] += 1
    _cache.clear()


def clear_weight_cache() -> None:
    weights_updated()


def track_optimizer(optimizer) -> None:
    """Cache FP8 weights between optimizer steps of `optimizer` (registers a post-step hook)."""
    optimizer.register_step_post_hook(lambda *_: weights_updated())
    _state["tracked"] += 1


def _base(t):
    return t._base if t._base is not None else t


def _lookup(key_tensors, key, make):
    if not _state["tracked"]:
        return make()
    bases = [_base(t) for t in key_tensors]
    versions = (_state["generation"],) + tuple(b._version for b in bases)
    slot = _cache.setdefault(bases[0], {})
    hit = slot.get(key)
    if hit is not None and hit[0] == versions:
        return hit[1]
    val = make()
    slot[key] = (versions, val)
    return val


def _geometry(t):
    return (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _empty_like_blocks(lead, N, K, device):
    return (torch.empty(*lead, N, K, dtype=E4M3, device=device),
            torch.empty(*lead, N // TILE, K // TILE, dtype=torch.float32, device=device),
            torch.empty(*lead, K, N, dtype=E4M3, device=device),
            torch.empty(*lead, K // TILE, N // TILE, dtype=torch.float32, device=device))


def _quantize(w, pow2, triton):
    if not triton:
        return quantize_weight(w.detach(), pow2)
    from .triton_quant import quantize_weight_into
    *lead, N, K = w.shape
    out = _empty_like_blocks(lead, N, K, w.device)
    quantize_weight_into(w.detach().contiguous(), *out, pow2, nonfinite_counter(w.device))
    return out


def fp8_weight(w, pow2, triton=True):
    """w [N, K] or [E, N, K] -> (q [.., N, K], s [.., N/128, K/128], qT [.., K, N], sT [.., K/128, N/128])."""
    check_dims(weight_rows=w.shape[-2], weight_cols=w.shape[-1])
    return _lookup([w], ("w", _geometry(w), pow2, triton), lambda: _quantize(w, pow2, triton))


def fp8_gateup(w_gate, w_up, pow2, triton=True):
    """Gate and up [I, H] of a dense SwiGLU as one stacked expert: (q [1, 2I, H], s, qT [1, H, 2I], sT)."""
    inter, H = w_gate.shape
    check_dims(intermediate=inter, hidden=H)

    def make():
        if not triton:
            return tuple(t.unsqueeze(0) for t in quantize_weight(torch.cat([w_gate.detach(), w_up.detach()]), pow2))
        from .triton_quant import quantize_weight_into
        q, s, qt, st = _empty_like_blocks([1], 2 * inter, H, w_gate.device)
        ib = inter // TILE
        cnt = nonfinite_counter(w_gate.device)
        for j, w in enumerate((w_gate, w_up)):
            quantize_weight_into(w.detach().contiguous(), q[0, j * inter:(j + 1) * inter], s[0, j * ib:(j + 1) * ib],
                                 qt[0, :, j * inter:(j + 1) * inter], st[0, :, j * ib:(j + 1) * ib], pow2, cnt)
        return q, s, qt, st

    return _lookup([w_gate, w_up], ("gateup", _geometry(w_gate), _geometry(w_up), id(_base(w_up)), pow2, triton),
                   make)
