"""The tiny model end to end with RINGLINEAR_BACKEND=triton (CPU: every Triton kernel through the interpreter)
equals the reference backend: full-forward logits, prefill + cached decode, and training gradients, all fp32
(1e-5 relative, the fp32 column of docs/numerics.md).
"""
import pytest
import torch

pytest.importorskip("triton")

from ringlinear.models.presets import get_preset  # noqa: E402
from ringlinear.models.modeling import RingLinearForCausalLM  # noqa: E402
from ringlinear.testing import perturb_norms_and_biases  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def model():
    m = RingLinearForCausalLM.from_config(get_preset("tiny"), dtype=torch.float32, seed=5).to(DEV)
    return perturb_norms_and_biases(m, seed=11)


def _ids(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, get_preset("tiny").vocab_size, shape, generator=g).to(DEV)


def test_logits_and_cached_decode_match(model, monkeypatch):
    ids = _ids(0, 2, 37)
    prompt, steps = 30, ids.shape[1] - 30
    runs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RINGLINEAR_BACKEND", backend)
        with torch.no_grad():
            full = model(ids).logits
            out = model(ids[:, :prompt], use_cache=True)
            dec = [model(ids[:, prompt + s:prompt + s + 1], cache=out.cache).logits[:, 0] for s in range(steps)]
        runs[backend] = (full, out.logits, torch.stack(dec, 1))
    for a, b in zip(runs["triton"], runs["torch"]):
        assert rel(a, b) < 1e-5
    # and the cached path agrees with the full forward under the Triton backend itself
    assert rel(runs["triton"][2], runs["triton"][0][:, prompt:]) < 1e-5


def test_training_gradients_match(model, monkeypatch):
    ids = _ids(1, 2, 40)
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RINGLINEAR_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert grads["triton"].keys() == grads["torch"].keys()
    for name, g in grads["torch"].items():
        assert rel(grads["triton"][name], g) < 1e-5, name
