"""`ringlinear train --precision fp8`: on a CPU it is a one-line error unless the emulation is asked for; with
--fp8-emulate a run on a model whose dimensions tile by 128 trains (finite, falling loss) and resumes."""
import json

import pytest

from ringlinear.train import train
from ringlinear.train.report import read_metrics

MODEL = dict(model_type="bailing_moe_linear", vocab_size=384, hidden_size=128, intermediate_size=256,
             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_experts=4,
             num_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=128,
             moe_shared_expert_intermediate_size=128, layer_group_size=2, group_norm_size=2,
             max_position_embeddings=1024, rope_theta=10000.0, routed_scaling_factor=2.5, eos_token_id=[1, 2],
             pad_token_id=1, torch_dtype="float32")


@pytest.fixture
def model_config(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(MODEL))
    return str(p)


def test_fp8_on_cpu_needs_the_explicit_emulation(tiny_cfg, tmp_path, model_config):
    cfg = tiny_cfg(tmp_path / "a", precision="fp8", model_config=model_config, steps=2, eval_every=0, save_every=0,
                   device="cpu")
    with pytest.raises(ValueError, match="--fp8-emulate"):
        train(cfg)


def test_fp8_flags_need_fp8_precision(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="need --precision fp8"):
        tiny_cfg(tmp_path / "c", precision="bf16", fp8_experts=True).validate()
    with pytest.raises(ValueError, match="cannot be combined"):
        tiny_cfg(tmp_path / "d", precision="fp8", numerics="aligned").validate()


def test_fp8_emulated_run_trains(tiny_cfg, tmp_path, model_config):
    cfg = tiny_cfg(tmp_path / "b", precision="fp8", fp8_emulate=True, fp8_experts=True, model_config=model_config,
                   steps=6, eval_every=0, save_every=3, seq_len=64, batch_size=2, lr=3e-3, warmup_steps=1)
    s = train(cfg)
    recs = [m for m in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in m]
    assert s["step"] == 6 and len(recs) == 6 and all(r["fp8_nonfinite"] == 0 for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]
