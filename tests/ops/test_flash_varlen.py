"""torch's flash varlen attention (CUDA only) as our packed causal GQA attention: forward and gradients against the
fp32 reference loop over documents."""
import pytest
import torch

from ringlinear.ops.attention import reference as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash varlen attention)")


def test_matches_reference_fwd_bwd():
    from ringlinear.ops.attention.flash_varlen import varlen_causal
    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, KV, D = 1000, 8, 2, 64
    cu = torch.tensor([0, 1, 130, 600, 1000], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(T, h, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
               for h in (H, KV, KV))
    o = varlen_causal(q, k, v, cu, D ** -0.5, max_seqlen=470)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = R.causal_attention_varlen(qr, kr, vr, cu.cpu(), D ** -0.5)
    assert float((o.float() - ref).norm() / ref.norm()) < 5e-3
    do = torch.randn(o.shape, device="cuda", generator=g).to(torch.bfloat16)
    grads = torch.autograd.grad(o, (q, k, v), do)
    rgrads = torch.autograd.grad(ref, (qr, kr, vr), do.float())
    for a, b in zip(grads, rgrads):
        assert float((a.float() - b).norm() / b.norm()) < 1e-2


def test_prefix_pieces_are_bottom_right_aligned():
    """Pieces with fewer queries than keys (a prefill chunk after a cached prefix): the flash kernel's causal mask
    must end at the last key; top-left alignment would show as a large error on every piece with Tq < Tk."""
    from test_attention_prefix import _masked_fp64, _pieces

    from ringlinear.ops.attention.flash_varlen import varlen_prefix_causal
    shapes = [(1, 40), (17, 600), (128, 128), (100, 2100), (3, 5)]
    q, k, v, cu_q, cu_k = _pieces(shapes, 16, 4, 128, seed=1, device="cuda", dtype=torch.bfloat16)
    got = varlen_prefix_causal(q, k, v, cu_q, cu_k, 128 ** -0.5, max_q=128, max_k=2100)
    want = _masked_fp64(q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), 128 ** -0.5)
    for n in range(len(shapes)):
        s, e = int(cu_q[n]), int(cu_q[n + 1])
        err = float((got[s:e].double().cpu() - want[s:e]).norm() / want[s:e].norm())
        assert err < 1e-2, (shapes[n], err)
