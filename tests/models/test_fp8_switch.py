"""The FP8 precision switch on a small model whose dimensions are multiples of 128: conversion keeps parameters,
names and the unconverted output; the emulated FP8 model tracks the fp32 loss; the Triton path (CPU: interpreter)
tracks the emulation; dimensions the recipe cannot tile are refused before anything changes.

Losses are compared, not gradients: at random init this model's gradients are so ill-conditioned that a pure
bf16 run differs from fp32 by more than 100% relative on the embedding gradient, so a gradient tolerance would
test the model, not the FP8 recipe (the layers' gradients are checked in tests/ops/test_fp8_autograd.py).
"""
import pytest
import torch
from torch import nn

from ringlinear.models import fp8 as M8
from ringlinear.models.config import RingLinearConfig
from ringlinear.models.presets import get_preset
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.ops import fp8 as F8

CFG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
           num_key_value_heads=1, head_dim=64, num_experts=8, num_shared_experts=1, num_experts_per_tok=2,
           n_group=4, topk_group=2, moe_intermediate_size=128, moe_shared_expert_intermediate_size=128,
           layer_group_size=2, group_norm_size=2, max_position_embeddings=1024, rope_theta=10000.0,
           eos_token_id=[1], pad_token_id=1, torch_dtype="float32")


def model(layers=3):
    return RingLinearForCausalLM.from_config(RingLinearConfig(**{**CFG, "num_hidden_layers": layers}),
                                             dtype=torch.float32, seed=3)


def loss_of(m, seq=40):
    ids = torch.randint(3, 256, (2, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(m.parameters()).device)
    logits = m(ids).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), logits.detach()


def test_conversion_keeps_parameters_and_disabled_output(monkeypatch):
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    m = model(layers=2)
    before = {k: v.data_ptr() for k, v in m.state_dict().items()}
    _, ref_logits = loss_of(m)
    M8.convert_to_fp8(m, F8.Fp8Recipe(emulate=True, experts=True))
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == before
    layer = m.model.layers[1]
    assert isinstance(layer.attention.query_key_value, M8.Fp8Linear)
    assert isinstance(layer.mlp, M8.Fp8SparseMoeBlock) and isinstance(layer.input_layernorm, M8.Fp8RMSNorm)
    assert type(layer.mlp.gate) is not M8.Fp8Linear and type(m.lm_head) is nn.Linear   # router, head untouched
    assert type(m.model.norm) is not M8.Fp8RMSNorm
    m.zero_grad()
    with F8.fp8_disabled():
        _, off_logits = loss_of(m)
    assert torch.equal(off_logits, ref_logits)


def test_emulated_fp8_loss_tracks_fp32(monkeypatch):
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    ref, _ = loss_of(model())
    m = M8.convert_to_fp8(model(), F8.Fp8Recipe(emulate=True, experts=True))
    loss, _ = loss_of(m)
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert len(grads) == len([p for p in m.parameters() if p.requires_grad])
    assert all(torch.isfinite(g).all() for g in grads)


def test_triton_path_tracks_emulation(monkeypatch):
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton" if dev == "cpu" else "auto")
    m = M8.convert_to_fp8(model(layers=2).to(dev), F8.Fp8Recipe(experts=True))
    tri, _ = loss_of(m, seq=24)
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    emu, _ = loss_of(M8.convert_to_fp8(model(layers=2), F8.Fp8Recipe(emulate=True, experts=True)), seq=24)
    assert abs(tri.item() - emu.item()) < 2e-3 * emu.item()
    assert F8.read_nonfinite(dev) == 0


def test_untileable_dims_are_refused_before_any_change():
    m = RingLinearForCausalLM.from_config(get_preset("tiny"), dtype=torch.float32)
    with pytest.raises(ValueError, match="is not a multiple of 128"):
        M8.convert_to_fp8(m, F8.Fp8Recipe(emulate=True, experts=True))
    assert not any(isinstance(mod, (M8.Fp8Linear, M8.Fp8RMSNorm)) for mod in m.modules())


def test_default_recipe_keeps_the_moe_in_its_precision(monkeypatch):
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    m = M8.convert_to_fp8(model(layers=2), F8.Fp8Recipe(emulate=True))
    dense, moe = m.model.layers
    assert isinstance(dense.mlp, M8.Fp8MLP) and isinstance(dense.post_attention_layernorm, M8.Fp8RMSNorm)
    assert type(moe.mlp) is not M8.Fp8SparseMoeBlock and type(moe.post_attention_layernorm) is not M8.Fp8RMSNorm
    assert isinstance(moe.attention.query_key_value, M8.Fp8Linear) and isinstance(moe.input_layernorm, M8.Fp8RMSNorm)
    loss, _ = loss_of(m)
    assert torch.isfinite(loss)
