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
