"""The CUDA prefill path of softmax attention (SDPA in the model dtype, row-blocked bottom-right causal mask) on
CPU tensors against the fp32 reference: same function, so the GPU path's masking logic is checked in CI."""
import pytest
import torch

from ringlinear.backend import use_sdpa
from ringlinear.ops.attention import sdpa
from ringlinear.ops.attention.reference import attention_with_prefix


@pytest.mark.parametrize("tq,tk,blk", [(9, 9, 1 << 20), (17, 60, 1 << 20), (50, 130, 1000), (1, 40, 7)])
def test_sdpa_prefix_matches_reference(tq, tk, blk):
    g = torch.Generator().manual_seed(tq * 1000 + tk)
    q = torch.randn(tq, 8, 16, generator=g)
    k, v = torch.randn(tk, 2, 16, generator=g), torch.randn(tk, 2, 16, generator=g)
    ref = attention_with_prefix(q.double(), k.double(), v.double(), 0.3)
    got = sdpa.attention_with_prefix(q, k, v, 0.3, max_mask_elems=blk)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_sdpa_rule():
    x = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert not use_sdpa(x) and not use_sdpa(x.float())  # CPU: the fp32 reference
