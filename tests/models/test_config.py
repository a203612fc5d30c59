"""Config: the published config.json round-trips, presets count the published parameters, decay formulas."""
import json

import pytest

from ringlinear.models.config import RingLinearConfig
from ringlinear.models.presets import get_preset
from ringlinear.ops.lightning_attn.decay import alibi_slopes, layer_log_decay
from ringlinear.models.modeling import count_parameters

# Ring-mini-linear-2.0 config.json as published (keys the loader ignores included).
MINI = {
    "architectures": ["BailingMoeLinearV2ForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_bailing_moe_linear_v2.BailingMoeLinearV2Config"},
    "embedding_dropout": 0.0, "eos_token_id": 156892, "first_k_dense_replace": 1, "group_norm_size": 4,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 5120, "layer_group_size": 5,
    "linear_silu": False, "max_position_embeddings": 131072, "model_type": "bailing_moe_linear",
    "moe_intermediate_size": 512, "moe_router_enable_expert_bias": True, "moe_shared_expert_intermediate_size": 512,
    "n_group": 8, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 256, "num_experts_per_tok": 8,
    "num_hidden_layers": 20, "num_key_value_heads": 4, "num_nextn_predict_layers": 0, "num_shared_experts": 1,
    "output_dropout": 0.0, "pad_token_id": 156892, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "routed_scaling_factor": 2.5, "router_dtype": "fp32",
    "score_function": "sigmoid", "tie_word_embeddings": False, "topk_group": 4, "torch_dtype": "bfloat16",
    "transformers_version": "4.56.1", "use_bias": False, "use_cache": True, "use_qk_norm": True,
    "use_qkv_bias": False, "use_rmsnorm": True, "vocab_size": 157184, "some_future_key": {"x": [1, 2]},
}


def test_published_config_roundtrip(tmp_path):
    cfg = RingLinearConfig.from_dict(MINI)
    assert cfg.extra == {"some_future_key": {"x": [1, 2]}}
    cfg.to_json(tmp_path / "config.json")
    back = json.load(open(tmp_path / "config.json"))
    for k, v in MINI.items():
        assert back[k] == v, k
    assert RingLinearConfig.from_json(tmp_path) == cfg


def test_config_errors():
    with pytest.raises(ValueError, match="unsupported model_type"):
        RingLinearConfig.from_dict({**MINI, "model_type": "qwen2"})
    bad = dict(MINI)
    del bad["group_norm_size"]
    with pytest.raises(ValueError, match="group_norm_size"):
        RingLinearConfig.from_dict(bad)


@pytest.mark.parametrize("edit,match", [
    ({"hidden_size": "256"}, r"hidden_size must be an integer, got '256'"),
    ({"num_attention_heads": 0}, r"num_attention_heads must be >= 1, got 0"),
    ({"num_key_value_heads": -2}, r"num_key_value_heads must be >= 1"),
    ({"rms_norm_eps": 0.0}, r"rms_norm_eps must be > 0"),
    ({"rope_theta": "1e6"}, r"rope_theta must be a number"),
    ({"use_qk_norm": "yes"}, r"use_qk_norm must be true or false"),
    ({"num_experts_per_tok": 300}, r"num_experts_per_tok \(300\) exceeds num_experts"),
    ({"eos_token_id": [1, "2"]}, r"eos_token_id must be an integer or a list of integers"),
])
def test_bad_field_is_named_when_read(tmp_path, edit, match):
    (tmp_path / "config.json").write_text(json.dumps({**MINI, **edit}))
    with pytest.raises(ValueError, match=match) as e:
        RingLinearConfig.from_json(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        RingLinearConfig.from_json(tmp_path)


def test_bad_config_is_one_line_from_the_cli(tmp_path, capsys):
    from ringlinear.cli import main
    (tmp_path / "config.json").write_text(json.dumps({**MINI, "num_attention_heads": 0}))
    assert main(["info", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_attention_heads must be >= 1" in err


def test_published_parameter_counts():
    mini = count_parameters(get_preset("ring-mini-linear-2.0"))
    assert round(mini["total"] / 1e9, 1) == 16.4 and round(mini["active_non_embedding"] / 1e6) == 957
    flash = count_parameters(get_preset("ring-flash-linear-2.0"))
    # The paper's "6.1B" is 6.157B truncated (model.md §1.2: 6.16B); 7.4B with embeddings.
    assert round(flash["total"] / 1e9, 1) == 104.2 and 6.1e9 <= flash["active_non_embedding"] < 6.2e9
    assert round(flash["active"] / 1e9, 1) == 7.4


def test_dense_baseline_shapes_match_qwen3_sizes():
    """Qwen3-8B has 8.19B parameters and Qwen3-32B 32.8B (untied embeddings); the baselines must cost the same."""
    for name, billions in (("qwen3-8b-shape", 8.19), ("qwen3-32b-shape", 32.76)):
        cfg = get_preset(name)
        n = count_parameters(cfg)
        assert round(n["total"] / 1e9, 2) == billions and n["active"] == n["total"]
        assert len(cfg.softmax_layers) == cfg.num_hidden_layers and not cfg.moe_layers


def test_slopes_and_decay_formulas():
    s = alibi_slopes(16)
    assert abs(s[0] - 2 ** -0.5) < 1e-12 and abs(s[-1] - 2 ** -8) < 1e-12
    assert alibi_slopes(12)[:8] == alibi_slopes(8) and alibi_slopes(12)[8:] == alibi_slopes(16)[0:8:2]
    hf = get_preset("ring-mini-linear-2.0")
    sg = hf.replace(decay_layer_formula="sglang")
    L = hf.num_hidden_layers
    for layer in (0, 5, 18):
        f_hf = 1 - (layer - 1) / (L - 1) + 1e-5
        f_sg = 1 - layer / (L - 1) + 1e-5
        assert abs(layer_log_decay(16, layer, L, "hf")[0].item() + s[0] * f_hf) < 1e-6
        assert abs(layer_log_decay(16, layer, L, sg.decay_layer_formula)[0].item() + s[0] * f_sg) < 1e-6
    assert layer_log_decay(16, 0, L, "hf")[0] < -s[0]  # HF's layer 0 factor exceeds 1
    with pytest.raises(ValueError, match="decay_layer_formula"):
        hf.replace(decay_layer_formula="mlx")


def test_softmax_layer_indices(tmp_path):
    tiny = get_preset("tiny")  # 5 layers, groups of 3: HF predicate gives linear, linear, softmax, softmax, softmax
    assert tiny.softmax_layer_indices is None and tiny.layer_types == ["linear", "linear"] + ["softmax"] * 3
    linear = tiny.replace(softmax_layer_indices=[])
    assert linear.layer_types == ["linear"] * 5
    one = tiny.replace(softmax_layer_indices=[3])
    assert one.layer_types == ["linear"] * 3 + ["softmax", "linear"]  # no softmax tail: the list is exact
    one.to_json(tmp_path / "config.json")
    back = RingLinearConfig.from_json(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["softmax_layer_indices"] == [3] and back == one
    for bad in ([5], [-1], [1, 1], [True], "0,1", [0.0]):
        with pytest.raises(ValueError, match="softmax_layer_indices"):
            tiny.replace(softmax_layer_indices=bad)


def test_pure_linear_model_runs():
    import torch

    from ringlinear.models.modeling import RingLinearForCausalLM
    cfg = get_preset("tiny").replace(softmax_layer_indices=[], torch_dtype="float32")
    m = RingLinearForCausalLM.from_config(cfg, dtype=torch.float32)
    assert not any(layer.is_softmax for layer in m.model.layers)
    out = m(torch.randint(0, cfg.vocab_size, (2, 7)))
    assert out.logits.shape == (2, 7, cfg.vocab_size) and torch.isfinite(out.logits).all()
