"""Training FLOPs of one run, written down (docs/sweep.md repeats it):

    C = tokens x [ 6 N_mm + 6 h V + 3 (n_softmax A_softmax + n_linear A_linear) ]

- N_mm: active non-embedding matmul weights per token: qkv, dense (o_proj) and g_proj of every layer, the dense
  MLP, per MoE layer the top-k routed experts plus the shared expert (gate, up, down) and the router; counted on the
  real module tree (meta device). Norm weights, biases and elementwise work are not counted. 6 = 2 (multiply-add)
  x 3 (forward + the two backward matmuls).
- 6 h V: the LM head. The embedding lookup costs no FLOPs.
- Attention, forward per token, times 3 for forward + backward:
  softmax (causal): A_softmax = 4 H D k, with k the mean number of keys a query sees (positions p+1 within its
  document segment: (T+1)/2 for a full row of T tokens; measured on the packed training rows);
  lightning (chunked, C = 64, full chunks as the kernels compute them): A_linear = H (4 C D + 4 D^2):
  intra-chunk Q K^T and (.)V (2 C D each), inter-chunk Q S and the state update K^T V (2 D^2 each).
"""
from __future__ import annotations

from dataclasses import dataclass

CHUNK = 64


@dataclass
class FlopCount:
    per_token: dict  # matmul, lm_head, softmax_attention, linear_attention, total (training FLOPs per token)
    matmul_params: dict  # active matmul weights per token by part

    @property
    def total(self) -> float:
        return self.per_token["total"]


def matmul_params(cfg) -> dict:
    """Active matmul weights per token, by part, from the model's own modules (built on the meta device)."""
    import torch

    from ..models.modeling import RingLinearForCausalLM
    with torch.device("meta"):
        m = RingLinearForCausalLM(cfg)
    parts = {"attention": 0, "dense_mlp": 0, "experts_routed": 0, "experts_shared": 0, "router": 0}
    for layer in m.model.layers:
        att = layer.attention
        parts["attention"] += sum(getattr(att, n).weight.numel() for n in ("query_key_value", "dense", "g_proj")
                                  if hasattr(att, n))
        mlp = layer.mlp
        if hasattr(mlp, "w13"):  # MoE: stacked experts w13 [E, 2I, h], w2 [E, h, I]
            parts["experts_routed"] += mlp.top_k * (mlp.w13[0].numel() + mlp.w2[0].numel())
            if mlp.shared_experts is not None:
                parts["experts_shared"] += sum(p.numel() for p in mlp.shared_experts.parameters())
            parts["router"] += mlp.gate.weight.numel()
        else:
            parts["dense_mlp"] += sum(p.numel() for p in mlp.parameters())
    parts["lm_head"] = m.lm_head.weight.numel()
    return parts


def flops_per_token(cfg, seq_len: int, mean_keys: float | None = None, chunk: int = CHUNK) -> FlopCount:
    """Training FLOPs per trained token. mean_keys: keys per query of the softmax layers ((seq_len+1)/2 if None)."""
    mp = matmul_params(cfg)
    L, H, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim_
    n_sm = sum(cfg.is_softmax_layer(i) for i in range(L))
    k = (seq_len + 1) / 2 if mean_keys is None else mean_keys
    t = {"matmul": 6.0 * sum(v for n, v in mp.items() if n != "lm_head"),
         "lm_head": 6.0 * mp["lm_head"],
         "softmax_attention": 3.0 * n_sm * 4 * H * D * k,
         "linear_attention": 3.0 * (L - n_sm) * H * (4 * chunk * D + 4 * D * D)}
    t["total"] = sum(t.values())
    return FlopCount(t, mp)


def mean_keys_per_query(rows, max_rows: int = 20000) -> float:
    """Mean of (position within its segment + 1) over the tokens of up to `max_rows` evenly spaced packed rows
    (`ringlinear.train.packing.PackedRows`): what a causal softmax query attends to on this data."""
    n = len(rows)
    idx = range(n) if n <= max_rows else (i * n // max_rows for i in range(max_rows))
    num = den = 0
    for i in idx:
        r = rows.row(i)
        bounds = r.seg_starts + [r.input_ids.size]
        for a, b in zip(bounds, bounds[1:]):
            ln = b - a
            num += ln * (ln + 1) // 2
            den += ln
    return num / max(den, 1)
