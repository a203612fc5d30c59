"""Our one-pass safetensors writer: files the safetensors library reads back exactly (every dtype the model and its
FP8 layout use, empty and 0-dim tensors, views), the digest equal to a fresh sha256 of the file, and the
ShardWriter's shards (single file and sharded) hashed the same way."""
import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ringlinear.models.checkpoint import INDEX_NAME, SINGLE_NAME, ShardWriter, sha256_file
from ringlinear.models.safetensors_write import write_safetensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(4, 7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, generator=g).half(), "f64": torch.randn(5, generator=g).double(),
        "i64": torch.randint(-9, 9, (4,), generator=g), "i32": torch.randint(-9, 9, (2, 2), generator=g).int(),
        "u8": torch.randint(0, 255, (9,), generator=g).to(torch.uint8), "bool": torch.rand(5, generator=g) > 0.5,
        "e4m3": torch.randn(8, 8, generator=g).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(3, generator=g).to(torch.float8_e5m2),
        "empty": torch.empty(0, 4), "scalar": torch.tensor(2.5), "view": base[1:4, ::2],
    }


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_files_read_back_exactly_and_the_digest_is_the_files(tmp_path):
    ts = _tensors()
    p = str(tmp_path / "x.safetensors")
    digest = write_safetensors(p, ts, metadata={"format": "pt"})
    assert digest == sha256_file(p)
    back = load_file(p)
    assert back.keys() == ts.keys()
    for k, t in ts.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(_bits(back[k]), _bits(t)), k
    with safe_open(p, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert n % 8 == 0  # the data starts 8-byte aligned


def test_unknown_dtype_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="c: dtype torch.complex64"):
        write_safetensors(str(tmp_path / "y.safetensors"), {"c": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.parametrize("max_bytes", [1 << 30, 100])
def test_shard_writer_digests_match_the_final_files(tmp_path, max_bytes):
    w = ShardWriter(str(tmp_path), max_bytes)
    ts = {k: v for k, v in _tensors().items() if v.numel()}
    for k, v in ts.items():
        w.add(k, v)
    w.close()
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert sorted(w.sha256) == files
    sharded = max_bytes < 1000
    assert (files == [SINGLE_NAME]) != sharded and os.path.exists(tmp_path / INDEX_NAME) == sharded
    for f in files:
        with open(tmp_path / f, "rb") as fh:
            assert w.sha256[f] == hashlib.sha256(fh.read()).hexdigest()
    got = {}
    for f in files:
        got.update(load_file(str(tmp_path / f)))
    assert all(torch.equal(_bits(got[k]), _bits(v)) for k, v in ts.items())
