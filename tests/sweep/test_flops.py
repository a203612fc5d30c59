"""The FLOP counter against a count by hand, and the mean causal context measured on packed rows."""
import numpy as np

from ringlinear.sweep.flops import flops_per_token, mean_keys_per_query
from ringlinear.sweep.grid import model_config, parse_ratios, shape_for
from ringlinear.train.packing import PackedRows, TokenStream


def test_flops_match_a_hand_count():
    # h 64, 4 layers (3 linear + softmax layer 3), 2 heads x 32, 1 KV head; layer 0 a dense MLP of 192;
    # layers 1-3 MoE: 8 experts of 64, top-2, one shared expert of 64; vocab 512.
    cfg = model_config(shape_for(64, 4), parse_ratios("3")[0], 64, 192, 512, 4096)
    assert [cfg.is_softmax_layer(i) for i in range(4)] == [False, False, False, True]
    linear_attn = 64 * (3 * 2 * 32) + 64 * 64 + 64 * 64  # qkv (MHA) + dense + g_proj = 20480
    softmax_attn = 64 * ((2 + 2 * 1) * 32) + 64 * 64      # qkv (GQA) + dense = 12288
    dense_mlp = 3 * 64 * 192                               # gate, up, down = 36864
    moe = 2 * 3 * 64 * 64 + 3 * 64 * 64 + 8 * 64          # 2 routed + shared + router = 37376
    n_mm = 3 * linear_attn + softmax_attn + dense_mlp + 3 * moe
    assert n_mm == 222720
    keys = (128 + 1) / 2                                   # a full causal row of 128 tokens
    want = {"matmul": 6 * n_mm,
            "lm_head": 6 * 64 * 512,
            "softmax_attention": 3 * 1 * 4 * 2 * 32 * keys,                      # QK^T and PV, 2 FLOPs per MAC
            "linear_attention": 3 * 3 * 2 * (4 * 64 * 32 + 4 * 32 * 32)}      # intra-chunk + state, C = 64
    got = flops_per_token(cfg, seq_len=128)
    for k, v in want.items():
        assert got.per_token[k] == v, k
    assert got.total == 1_803_648 == sum(want.values())
    # measured context: fewer keys per query, fewer softmax FLOPs, nothing else changes
    short = flops_per_token(cfg, seq_len=128, mean_keys=10.0)
    assert short.per_token["softmax_attention"] == 3 * 4 * 2 * 32 * 10.0
    assert short.per_token["matmul"] == got.per_token["matmul"]


def test_pure_softmax_and_pure_linear_terms():
    sm = model_config(shape_for(64, 4), parse_ratios("softmax")[0], 64, 192, 512, 4096)
    lin = model_config(shape_for(64, 4), parse_ratios("linear")[0], 64, 192, 512, 4096)
    assert flops_per_token(sm, 128).per_token["linear_attention"] == 0
    assert flops_per_token(lin, 128).per_token["softmax_attention"] == 0
    assert lin.softmax_layer_indices == [] and sm.layer_group_size == 1


def test_mean_keys_per_query_by_hand():
    # 21 tokens, documents starting at 0, 4 and 15; rows of 10 -> row 0: segments of 4 and 6, row 1: 5 and 5
    stream = TokenStream(np.arange(21, dtype=np.int32), np.array([0, 4, 15], dtype=np.int64))
    rows = PackedRows(stream, 10)
    assert len(rows) == 2
    want = (4 * 5 / 2 + 6 * 7 / 2 + 5 * 6 / 2 + 5 * 6 / 2) / 20
    assert mean_keys_per_query(rows) == want == 3.05
    full = PackedRows(TokenStream(np.arange(41, dtype=np.int32), np.array([0], dtype=np.int64)), 10)
    assert mean_keys_per_query(full) == (10 + 1) / 2
