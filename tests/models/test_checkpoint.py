"""Checkpoint IO: bitwise round trip, sharding, MTP skipping, atomic save, and a clear error per broken case."""
import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ringlinear.models.checkpoint import CheckpointError
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ck") / "tiny"), seed=11)


def _ids(m, n=12):
    return torch.randint(3, m.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def test_roundtrip_bitwise_and_sharded(ckpt, tmp_path):
    m = RingLinearForCausalLM.from_pretrained(ckpt)
    ids = _ids(m)
    ref = m(ids).logits
    out = tmp_path / "sharded"
    m.save_pretrained(out, max_shard_bytes=200_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= set(files)
    m2 = RingLinearForCausalLM.from_pretrained(out)
    assert torch.equal(m2(ids).logits, ref)
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_load_dtype_keeps_fp32_buffers(ckpt):
    m = RingLinearForCausalLM.from_pretrained(ckpt, dtype="bfloat16")
    assert m.lm_head.weight.dtype == torch.bfloat16
    moe = m.model.layers[1].mlp
    assert moe.gate.expert_bias.dtype == torch.float32 and moe.gate.expert_bias.abs().sum() > 0
    assert m.model.layers[0].attention.g_gamma.dtype == torch.float32
    # checkpoint names are views into the stacked expert Parameters: no copies on load or save
    sd = m.state_dict()
    assert sd["model.layers.1.mlp.experts.3.up_proj.weight"].data_ptr() == moe.w13[3, moe.inter:].data_ptr()
    assert "model.layers.1.mlp.w13" not in sd


def _copy(ckpt, dst):
    os.makedirs(dst)
    for f in os.listdir(ckpt):
        with open(os.path.join(ckpt, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def _edit_weights(d, fn):
    p = os.path.join(d, "model.safetensors")
    sd = load_file(p)
    fn(sd)
    save_file(sd, p)


def test_missing_tensor(ckpt, tmp_path):
    d = _copy(ckpt, str(tmp_path / "c"))
    _edit_weights(d, lambda sd: sd.pop("model.layers.1.attention.g_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.attention\.g_norm\.weight"):
        RingLinearForCausalLM.from_pretrained(d)


def test_unexpected_tensor(ckpt, tmp_path):
    d = _copy(ckpt, str(tmp_path / "c"))
    _edit_weights(d, lambda sd: sd.__setitem__("model.layers.0.attention.bogus.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*bogus"):
        RingLinearForCausalLM.from_pretrained(d)


def test_wrong_shape(ckpt, tmp_path):
    d = _copy(ckpt, str(tmp_path / "c"))
    _edit_weights(d, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*expected shape \(64,\), found \(65,\)"):
        RingLinearForCausalLM.from_pretrained(d)


def test_truncated_file(ckpt, tmp_path):
    d = _copy(ckpt, str(tmp_path / "c"))
    p = os.path.join(d, "model.safetensors")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        RingLinearForCausalLM.from_pretrained(d)


def test_not_safetensors(ckpt, tmp_path):
    d = _copy(ckpt, str(tmp_path / "c"))
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        RingLinearForCausalLM.from_pretrained(d)


def test_unsupported_model_type(ckpt, tmp_path):
    d = _copy(ckpt, str(tmp_path / "c"))
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        RingLinearForCausalLM.from_pretrained(d)


def _edit_config(d, **kw):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg.update(kw)
    json.dump(cfg, open(p, "w"))
    return cfg


def test_mtp_tensors_skipped_with_one_log_line(ckpt, tmp_path, caplog):
    d = _copy(ckpt, str(tmp_path / "c"))
    L = _edit_config(d, num_nextn_predict_layers=1)["num_hidden_layers"]  # one declared MTP block: layer L

    def add(sd):
        sd[f"model.layers.{L}.eh_proj.weight"] = torch.randn(4, 8)
        sd[f"model.layers.{L}.enorm.weight"] = torch.randn(4)
        sd["model.mtp.final_layernorm.weight"] = torch.randn(4)
    _edit_weights(d, add)
    with caplog.at_level(logging.INFO, logger="ringlinear"):
        m = RingLinearForCausalLM.from_pretrained(d)
    lines = [r.getMessage() for r in caplog.records if "MTP" in r.getMessage()]
    assert len(lines) == 1 and "3 MTP tensors" in lines[0]
    assert m is not None


def test_weights_deeper_than_the_config_are_an_error(ckpt, tmp_path):
    # config.json says 4 layers, the weights hold 5: loading 4 of them would "work" and generate garbage.
    d = _copy(ckpt, str(tmp_path / "c"))
    _edit_config(d, num_hidden_layers=4)
    with pytest.raises(CheckpointError, match=r"num_hidden_layers 4 and num_nextn_predict_layers 0.*layer\(s\) 4\.\.4"):
        RingLinearForCausalLM.from_pretrained(d)
    _edit_config(d, num_nextn_predict_layers=1)  # declared as an MTP block: skipped
    assert RingLinearForCausalLM.from_pretrained(d).config.num_hidden_layers == 4


def test_index_names_missing_shard(ckpt, tmp_path):
    m = RingLinearForCausalLM.from_pretrained(ckpt)
    out = tmp_path / "s"
    m.save_pretrained(out, max_shard_bytes=200_000)
    shard = sorted(f for f in os.listdir(out) if f.startswith("model-"))[1]
    os.remove(out / shard)
    with pytest.raises(CheckpointError, match=f"names shard '{shard}', which does not exist"):
        RingLinearForCausalLM.from_pretrained(out)


def test_atomic_save_keeps_old_checkpoint_on_failure(ckpt, tmp_path, monkeypatch):
    m = RingLinearForCausalLM.from_pretrained(ckpt)
    out = tmp_path / "dst"
    m.save_pretrained(out)
    before = {f: os.path.getsize(out / f) for f in os.listdir(out)}

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("ringlinear.models.checkpoint.write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        m.save_pretrained(out)
    assert {f: os.path.getsize(out / f) for f in os.listdir(out)} == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # temp dir cleaned up


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_follow_the_umask(ckpt, tmp_path, umask):
    m = RingLinearForCausalLM.from_pretrained(ckpt)
    old = os.umask(umask)
    try:
        m.save_pretrained(tmp_path / "out", max_shard_bytes=200_000)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask
    for f in os.listdir(tmp_path / "out"):
        assert os.stat(tmp_path / "out" / f).st_mode & 0o777 == 0o666 & ~umask, f


def test_from_pretrained_config_overrides(ckpt):
    from ringlinear.ops.lightning_attn.decay import layer_log_decay
    m = RingLinearForCausalLM.from_pretrained(ckpt, decay_layer_formula="sglang")
    L, H = m.config.num_hidden_layers, m.config.num_attention_heads
    assert m.config.decay_layer_formula == "sglang"
    assert torch.equal(m.model.layers[0].attention.g_gamma, layer_log_decay(H, 0, L, "sglang"))
    assert not torch.equal(m.model.layers[0].attention.g_gamma, layer_log_decay(H, 0, L, "hf"))
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['no_such_field'\]"):
        RingLinearForCausalLM.from_pretrained(ckpt, no_such_field=1)
    with pytest.raises(ValueError, match="decay_layer_formula"):
        RingLinearForCausalLM.from_pretrained(ckpt, decay_layer_formula="mlx")
