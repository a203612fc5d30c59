"""The sweep's grid: ratios, parameter-matched model shapes per size, FLOP budgets, and the runs they make.

Ratio M = M linear-attention layers per softmax layer (layer group size M+1); `softmax` = every layer softmax,
`linear` = none. Within a size every ratio has the same depth, width, heads and experts; only the attention kind
of each layer differs, and the expert width (plus the dense layer-0 MLP for the remainder) is solved so that the
*active non-embedding* parameter count equals the size's target (docs/sweep.md says why active, not total).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from ..models.config import RingLinearConfig

MATCH_TOLERANCE = 0.02  # every ratio's active non-embedding count within 2% of the size's target
EXPERTS, TOP_K, N_GROUP, TOPK_GROUP, SHARED = 8, 2, 4, 2, 1
MOE_QUANTUM, DENSE_QUANTUM = 32, 16  # fused MoE tiles need multiples of 16; 32 keeps them wider


@dataclass(frozen=True)
class Ratio:
    label: str  # "softmax", "linear" or the integer M as text
    m: float    # linear layers per softmax layer: 0 for softmax, inf for linear

    @property
    def kind(self) -> str:
        return "softmax" if self.m == 0 else "linear" if math.isinf(self.m) else "hybrid"

    def softmax_layers(self, n_layers: int) -> list[int]:
        """Softmax layer indices: groups of M linear + 1 softmax (the released code's rule where L is a multiple
        of M+1); otherwise round(L/(M+1)) softmax layers spread evenly, the last layer one of them."""
        if self.m == 0:
            return list(range(n_layers))
        if math.isinf(self.m):
            return []
        n_sm = max(1, round(n_layers / (self.m + 1)))
        return [round((j + 1) * n_layers / n_sm) - 1 for j in range(n_sm)]


def parse_ratios(text: str) -> tuple[Ratio, ...]:
    out = []
    for tok in _items(text, "--ratios"):
        t = tok.lower()
        if t in ("softmax", "linear"):
            out.append(Ratio(t, 0.0 if t == "softmax" else math.inf))
        elif t.isdigit() and int(t) >= 1:
            out.append(Ratio(str(int(t)), float(int(t))))
        else:
            raise ValueError(f"--ratios: {tok!r} is not 'softmax', 'linear' or a positive integer M "
                             "(M linear layers per softmax layer)")
    if len({r.label for r in out}) != len(out):
        raise ValueError(f"--ratios {text!r} repeats a ratio")
    return tuple(sorted(out, key=lambda r: r.m))


_SI = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


def parse_sizes(text: str) -> list[tuple[str, float]]:
    """'5M,20M,60M' -> [(label, active non-embedding params)]."""
    out = []
    for tok in _items(text, "--sizes"):
        m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([kKmMbBgG]?)", tok)
        if not m or float(m.group(1)) <= 0:
            raise ValueError(f"--sizes: {tok!r} is not a parameter count like 5M, 250K or 1.5M")
        n = float(m.group(1)) * _SI[m.group(2).lower()]
        if n < 2e4:
            raise ValueError(f"--sizes: {tok} is below the smallest shape this sweep builds (20K parameters)")
        out.append((tok.upper().replace("G", "B"), n))
    if len({n for _, n in out}) != len(out):
        raise ValueError(f"--sizes {text!r} repeats a size")
    return sorted(out, key=lambda x: x[1])


def parse_budgets(text: str) -> list[tuple[str, float]]:
    """'3e14,1e15' -> [(label, training FLOPs)]."""
    out = []
    for tok in _items(text, "--budgets"):
        try:
            c = float(tok)
        except ValueError:
            raise ValueError(f"--budgets: {tok!r} is not a FLOP count like 3e14") from None
        if not math.isfinite(c) or c <= 0:
            raise ValueError(f"--budgets: {tok!r} must be a positive FLOP count")
        out.append((budget_label(c), c))
    if len({c for _, c in out}) != len(out):
        raise ValueError(f"--budgets {text!r} repeats a budget")
    return sorted(out, key=lambda x: x[1])


def budget_label(c: float) -> str:
    return f"{c:.3g}".replace("e+", "e")


def _items(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{flag} is empty")
    return items


# ---------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """What every ratio of one size shares."""
    hidden: int
    layers: int
    heads: int
    head_dim: int
    kv_heads: int
    norm_groups: int

    @property
    def moe_base(self) -> int:  # nominal expert width before matching
        return max(MOE_QUANTUM, _round(self.hidden // 2, MOE_QUANTUM))

    @property
    def dense_base(self) -> int:  # nominal dense layer-0 MLP width before matching
        return _round(2 * self.hidden, DENSE_QUANTUM)


def _round(x: float, q: int) -> int:
    return int(round(x / q)) * q


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, cap) + 1) if n % d == 0)


def shape_for(hidden: int, layers: int) -> Shape:
    # head_dim a power of two the Triton kernels take (16..256); GQA with about 4 query heads per KV head and
    # norm groups of about 4 heads, as in Ring-mini (16 heads, 4 KV heads, 4 groups).
    d = 64 if hidden >= 256 else 32 if hidden >= 64 else 16
    h = hidden // d
    return Shape(hidden, layers, h, d, _largest_divisor_at_most(h, h // 4), _largest_divisor_at_most(h, h // 4))


def default_depth(target: float) -> int:
    return 4 if target < 1e6 else 8 if target < 30e6 else 12


def base_shapes(target: float, depth: int) -> list[Shape]:
    """Widths by how near their nominal model (half the layers linear, experts of width h/2) is to the target."""
    def nominal(h):  # per layer: attention ~3.75 h^2 (softmax 2.5, linear 5), 3 active experts of h/2 ~4.5 h^2
        return depth * 8.25 * h * h
    cands = [h for h in range(32, 8193, 32) if h < 256 or h % 64 == 0 and (h < 512 or h % 128 == 0)]
    return [shape_for(h, depth) for h in sorted(cands, key=lambda c: abs(math.log(nominal(c) / target)))[:4]]


def model_config(shape: Shape, ratio: Ratio, moe_inter: int, dense_inter: int, vocab: int,
                 max_positions: int) -> RingLinearConfig:
    L = shape.layers
    sm = ratio.softmax_layers(L)
    group = 1 if ratio.m == 0 else L + 1 if math.isinf(ratio.m) else int(ratio.m) + 1
    cfg = RingLinearConfig(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=dense_inter, num_hidden_layers=L,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        num_experts=EXPERTS, num_shared_experts=SHARED, num_experts_per_tok=TOP_K, n_group=N_GROUP,
        topk_group=TOPK_GROUP, moe_intermediate_size=moe_inter, moe_shared_expert_intermediate_size=moe_inter,
        layer_group_size=group, group_norm_size=shape.norm_groups, max_position_embeddings=max_positions,
        rope_theta=10000.0, torch_dtype="float32")
    hf = [i for i in range(L) if cfg.is_softmax_layer(i)]
    # Only where the released code's predicate gives another layout is the explicit list written.
    return cfg if hf == sm else cfg.replace(softmax_layer_indices=sm)


def active_params(cfg: RingLinearConfig) -> dict:
    from ..models.modeling import count_parameters
    return count_parameters(cfg)


@dataclass
class Matched:
    ratio: Ratio
    config: RingLinearConfig
    active: int  # active non-embedding parameters
    total: int   # total non-embedding parameters (all experts)

    @property
    def layout(self) -> str:
        n_sm = sum(self.config.is_softmax_layer(i) for i in range(self.config.num_hidden_layers))
        return f"{self.config.num_hidden_layers - n_sm} linear + {n_sm} softmax"


def match(shape: Shape, ratio: Ratio, target: float, vocab: int, max_positions: int) -> Matched:
    """Solve the expert width (multiple of 32), then the dense layer-0 width (multiple of 16), for the target.

    The active non-embedding count is affine in both widths: per unit of expert width 3h weights (gate, up, down)
    for each of the top-k and shared experts of every MoE layer, per unit of layer-0 width 3h. The count of the
    result is then taken from the module tree and checked against the tolerance."""
    i0, f0 = shape.moe_base, shape.dense_base
    cfg0 = model_config(shape, ratio, i0, f0, vocab, max_positions)
    n0 = active_params(cfg0)["active_non_embedding"]
    n_moe = sum(cfg0.is_moe_layer(i) for i in range(shape.layers))
    per_i, per_f = 3 * shape.hidden * (TOP_K + SHARED) * n_moe, 3 * shape.hidden
    exact = i0 + (target - n0) / per_i  # expert width that would match with the nominal layer-0 width
    best = None
    for moe in {max(MOE_QUANTUM, q * MOE_QUANTUM) for q in (math.floor(exact / MOE_QUANTUM),
                                                            math.ceil(exact / MOE_QUANTUM))}:
        dense = _round(f0 + (target - n0 - per_i * (moe - i0)) / per_f, DENSE_QUANTUM)
        if dense >= 2 * DENSE_QUANTUM and (best is None or abs(math.log(dense / f0)) < best[0]):
            best = (abs(math.log(dense / f0)), moe, dense)
    if best is None:
        raise ValueError(f"no {target / 1e6:g}M-parameter model of ratio {ratio.label} with {shape.layers} layers of "
                         f"width {shape.hidden}")
    _, moe, dense = best
    cfg = model_config(shape, ratio, moe, dense, vocab, max_positions)
    c = active_params(cfg)
    m = Matched(ratio, cfg, c["active_non_embedding"], c["total_non_embedding"])
    if abs(m.active / target - 1) > MATCH_TOLERANCE:
        raise ValueError(f"ratio {ratio.label} at size {target / 1e6:g}M: {m.active} active parameters, more than "
                         f"{MATCH_TOLERANCE:.0%} from the target")
    return m


@functools.lru_cache(maxsize=64)
def match_size(target: float, ratios: tuple[Ratio, ...], vocab: int, max_positions: int, depth: int | None = None):
    """Parameter-matched configs of every ratio for one size: (shape, [Matched])."""
    groups = [int(r.m) + 1 for r in ratios if r.kind == "hybrid"]
    need = max(groups, default=1)
    if depth and need > depth:
        raise ValueError(f"--depth {depth}: ratio {need - 1} needs at least {need} layers")
    L = depth or max(default_depth(target), need)
    lcm = math.lcm(*groups) if groups else 1
    if not depth and L % lcm and -(-L // lcm) * lcm <= 2 * L:  # exact groups for every ratio where affordable
        L = -(-L // lcm) * lcm
    # Of the widths near the target, the one whose solved expert and layer-0 widths stay nearest their nominal
    # values (h/2 and 2h) for every ratio: the matching should move capacity, not reshape the model.
    err, best = None, None
    for shape in base_shapes(target, L):
        try:
            cand = [match(shape, r, target, vocab, max_positions) for r in ratios]
        except ValueError as e:
            err = e
            continue
        bend = max(abs(math.log(m.config.moe_intermediate_size / shape.moe_base))
                   + abs(math.log(m.config.intermediate_size / shape.dense_base)) for m in cand)
        if best is None or bend < best[0]:
            best = (bend, shape, cand)
    if best is None:
        raise ValueError(f"{err}: the target is too small for {L} layers (a larger size, or fewer layers with "
                         "--depth)")
    _, shape, out = best
    layouts = {}
    for m in out:
        key = tuple(m.config.is_softmax_layer(i) for i in range(L))
        if key in layouts:
            raise ValueError(f"ratios {layouts[key]} and {m.ratio.label} give the same layout ({m.layout}) on {L} "
                             "layers: drop one or set --depth to a multiple of both group sizes")
        layouts[key] = m.ratio.label
    return shape, out
