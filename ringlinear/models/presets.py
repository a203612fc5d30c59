"""Every named model shape, in one registry: the published checkpoints, the debug models and the shapes
`ringlinear train` initialises (`--model-preset`). `get_preset(name)` returns a fresh `RingLinearConfig`.

The dataclass defaults are Ring-mini-linear-2.0's, so a preset lists only what differs from it.
"""
from __future__ import annotations

import copy

from .config import RingLinearConfig

# The small random-init shapes share these: fp32 weights, RoPE base 10k, 8 routed experts (top-2) and a shared one,
# and the special-token ids of the byte-level BPE tokenizers ringlinear writes (models/tokenizer.py).
_SMALL = dict(torch_dtype="float32", rope_theta=10000.0, num_experts=8, num_shared_experts=1, num_experts_per_tok=2,
              eos_token_id=[1, 2], pad_token_id=1, bos_token_id=0)
_TINY = dict(_SMALL, vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_group=4, topk_group=2,
             moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, layer_group_size=3, group_norm_size=2,
             max_position_embeddings=4096)

# name -> (what it is, the fields that differ from Ring-mini-linear-2.0)
PRESETS: dict[str, tuple[str, dict]] = {
    # published; the flash checkpoint's group_norm_size and rope_theta are not confirmed (model.md §1.1): read its
    # config.json
    "ring-mini-linear-2.0": ("Ring-mini-linear-2.0 (16.4B total, 957M active)", {}),
    "ring-flash-linear-2.0": ("Ring-flash-linear-2.0 (104.2B total, 6.1B active)", dict(
        hidden_size=4096, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, moe_intermediate_size=1024, moe_shared_expert_intermediate_size=1024,
        layer_group_size=8, group_norm_size=8)),
    # cost baselines (benchmarks/long_context.py): the dense models the paper compares against (Figs. 7, 8), in this
    # architecture: every layer softmax GQA with a dense SwiGLU MLP. Shapes from the Qwen3 configs; what differs
    # from real Qwen3 layers: Ring's QK-norm + RoPE code path, full rotary here; costs, not quality.
    "qwen3-8b-shape": ("dense baseline for Ring-mini: Qwen3-8B's shape, every layer softmax + dense MLP", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, num_experts=None, first_k_dense_replace=36, layer_group_size=1,
        partial_rotary_factor=1.0, rope_theta=1000000.0)),
    "qwen3-32b-shape": ("dense baseline for Ring-flash: Qwen3-32B's shape, every layer softmax + dense MLP", dict(
        vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, num_experts=None, first_k_dense_replace=64, layer_group_size=1,
        partial_rotary_factor=1.0, rope_theta=1000000.0)),
    # debug
    "tiny": ("tests: every feature on (dense layer 0, grouped MoE, linear + softmax layers, a softmax tail)",
             _TINY),
    "tiny-fp8": ("tests and benchmarks of FP8: every feature of tiny with each dimension a multiple of 128 (the "
                 "128x128 weight blocks)", dict(
                     _SMALL, vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=64, n_group=4, topk_group=2,
                     moe_intermediate_size=128, moe_shared_expert_intermediate_size=128, layer_group_size=2,
                     group_norm_size=2, max_position_embeddings=1024)),
    "small": ("a few-million-parameter hybrid for demos (3 linear + 1 softmax per group)", dict(
        _SMALL, vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, n_group=2, topk_group=1, moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=256, layer_group_size=4, group_norm_size=2, max_position_embeddings=8192,
        eos_token_id=[0], pad_token_id=0, bos_token_id=None)),
    # training shapes (`ringlinear train --model-preset`)
    "tiny-code": ("the default training shape: 6 layers in groups of 3 (2 linear : 1 softmax), dense layer 0, 8 "
                  "experts top-2 of 2 groups + shared; head_dim 32, a size the Triton kernels take", dict(
                      _SMALL, vocab_size=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=32, n_group=4, topk_group=2,
                      moe_intermediate_size=128, moe_shared_expert_intermediate_size=128, layer_group_size=3,
                      group_norm_size=2, max_position_embeddings=4096)),
    "tiny-test": ("the tiny model, as the tiny-test training preset names it", _TINY),
}


def get_preset(name: str) -> RingLinearConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return RingLinearConfig(**copy.deepcopy(PRESETS[name][1]))  # no list shared between configs
