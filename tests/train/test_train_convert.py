"""Softmax -> hybrid conversion: weights, the expanded attention reproduced exactly, and continued training."""
import os

import pytest
import torch
from safetensors.torch import load_file

from ringlinear.models.presets import get_preset
from ringlinear.models.context import StatelessContext
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.ops import norm as norm_ops
from ringlinear.ops.lightning_attn.reference import lightning_attn_recurrent
from ringlinear.testing import make_tiny_checkpoint
from ringlinear.train.convert import convert_softmax_to_hybrid, expand_qkv

LINEAR = [0, 1, 3, 4]  # 6 layers, group size 3: layers 2 and 5 stay softmax


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    src = make_tiny_checkpoint(str(d / "softmax"), num_hidden_layers=6, layer_group_size=1)  # every layer GQA
    info = convert_softmax_to_hybrid(src, 3, str(d / "hybrid"), seed=7)
    return src, str(d / "hybrid"), info


def test_weights(converted):
    src, dst, info = converted
    assert info == {"out": dst, "linear": 4, "softmax": 2, "expanded": 4}
    cfg = RingLinearForCausalLM.from_pretrained(dst).config
    assert [i for i in range(6) if not cfg.is_softmax_layer(i)] == LINEAR and cfg.layer_group_size == 3
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(dst, "model.safetensors"))
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
    for name, t in a.items():
        i = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if i in LINEAR and "query_key_value" in name:
            q, k, v = t.split([H * D, KV * D, KV * D])
            e = b[name]
            assert e.shape == (3 * H * D, t.shape[1])
            for j in range(H):  # query head j of a GQA layer reads kv head j // (H / KV)
                kv = j // (H // KV)
                assert torch.equal(e[j * D:(j + 1) * D], q[j * D:(j + 1) * D])
                assert torch.equal(e[(H + j) * D:(H + j + 1) * D], k[kv * D:(kv + 1) * D])
                assert torch.equal(e[(2 * H + j) * D:(2 * H + j + 1) * D], v[kv * D:(kv + 1) * D])
        else:
            assert torch.equal(b[name], t), name  # everything else, expert biases included, is kept
    for i in LINEAR:
        assert torch.equal(b[f"model.layers.{i}.attention.g_norm.weight"], torch.ones(H * D))
        g = b[f"model.layers.{i}.attention.g_proj.weight"]
        assert g.shape == (H * D, cfg.hidden_size) and 0.01 < g.std() < 0.03  # fresh N(0, 0.02)
    assert set(b) - set(a) == {f"model.layers.{i}.attention.{n}.weight" for i in LINEAR for n in ("g_proj", "g_norm")}
    assert os.path.exists(os.path.join(dst, "tokenizer.json"))


def _gqa_as_linear(src_layer, x, cos, sin, g_gamma, expand):
    """What a converted layer must compute with open gates and identity norms: the source GQA projections, QK-norm
    and RoPE, KV heads repeated by `expand`, the lightning recurrence (token by token, not the chunked kernel the
    model runs), then the source output projection."""
    att = src_layer.attention
    T, H, KV, D = x.shape[0], att.num_heads, att.num_kv_heads, att.head_dim
    q, k, v = att.query_key_value(x).view(T, H + 2 * KV, D).split([H, KV, KV], dim=1)
    q, k = norm_ops.qk_norm_rope(q, k, att.query_layernorm.weight, att.key_layernorm.weight, cos, sin, att.eps)
    k, v = expand(k, H // KV), expand(v, H // KV)
    o, _ = lightning_attn_recurrent(q[None], k[None], v[None], g_gamma, scale=D ** -0.5)
    return att.dense(o[0].reshape(T, H * D))


def test_open_gates_identity_norms_reproduce_expanded_attention(converted, monkeypatch):
    """fp64; can fail: a tiled (instead of interleaved) KV repeat is caught by the negative control below."""
    src, dst, _ = converted
    a = RingLinearForCausalLM.from_pretrained(src, dtype=torch.float64)
    b = RingLinearForCausalLM.from_pretrained(dst, dtype=torch.float64)
    # gates forced open (sigmoid -> 1) and the group norm made the identity
    monkeypatch.setattr(norm_ops, "group_rms_norm_gate", lambda o, w, gate, groups, eps: o)
    T = 150  # crosses two 64-token chunks
    x = torch.randn(T, a.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ctx = StatelessContext(torch.tensor([0, T], dtype=torch.int32))
    cos, sin = b.model.rotary_emb(ctx.positions)
    interleave = lambda t, r: t.repeat_interleave(r, dim=1)  # noqa: E731
    tiled = lambda t, r: t.repeat(1, r, 1)  # noqa: E731  (the classic mistake)
    with torch.no_grad():
        for i in range(6):
            la, lb = a.model.layers[i], b.model.layers[i]
            got = lb.attention(x, cos, sin, ctx)
            if i in LINEAR:
                want = _gqa_as_linear(la, x, cos, sin, lb.attention.g_gamma, interleave)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
                wrong = _gqa_as_linear(la, x, cos, sin, lb.attention.g_gamma, tiled)
                assert (got - wrong).abs().max() > 1e-4
            else:  # softmax layers untouched: bitwise the source layer
                assert torch.equal(got, la.attention(x, cos, sin, ctx))
            assert torch.equal(lb.mlp(x), la.mlp(x))


def test_expand_qkv_bias_and_errors(converted, tmp_path):
    w = torch.arange(16, dtype=torch.float32)  # a qkv bias with H=2, KV=1, D=4: (H + 2KV) * D = 16 entries
    e = expand_qkv(w, H=2, KV=1, D=4)
    assert e.tolist() == w[:8].tolist() + w[8:12].tolist() * 2 + w[12:16].tolist() * 2
    src, dst, _ = converted
    with pytest.raises(ValueError, match="already a hybrid"):
        convert_softmax_to_hybrid(dst, 3, str(tmp_path / "x"))
    with pytest.raises(ValueError, match=">= 2"):
        convert_softmax_to_hybrid(src, 1, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no linear layer"):
        convert_softmax_to_hybrid(src, 7, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_converted_model_trains(converted, tiny_cfg, tmp_path):
    from ringlinear.train import train
    _, dst, _ = converted
    s = train(tiny_cfg(tmp_path / "cont", init_from=dst, steps=12, lr=3e-3, eval_every=0, save_every=0))
    assert s["val_loss_end"] < s["val_loss_start"] - 0.3, s  # measured: 5.63 -> 4.9
    m = RingLinearForCausalLM.from_pretrained(tmp_path / "cont" / "final")
    assert m.config.layer_group_size == 3 and m.config.vocab_size == get_preset("tiny").vocab_size
