"""sequence_logprobs against an independent computation (each sample alone through model(), full logits)."""
import pytest
import torch

import ringlinear.rl.logprobs as L
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.rl import sequence_logprobs


@pytest.fixture(scope="module")
def model(tiny_dir):
    return RingLinearForCausalLM.from_pretrained(tiny_dir)


def _samples(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    lens = [(int(a), int(b)) for a, b in torch.randint(1, 90, (n, 2), generator=g)]
    return ([torch.randint(0, 384, (p,), generator=g).tolist() for p, _ in lens],
            [torch.randint(0, 384, (c,), generator=g).tolist() for _, c in lens])


def _reference(model, prompts, completions, temperature=1.0):
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        logits = model(ids).logits[0, len(p) - 1:-1].double() / temperature  # positions predicting c
        out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None])[:, 0])
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_each_sample_alone(model, temperature):
    prompts, comps = _samples(1)
    with torch.no_grad():
        got = sequence_logprobs(model, prompts, comps, temperature=temperature)
        ref = _reference(model, prompts, comps, temperature)
    assert [t.shape[0] for t in got] == [len(c) for c in comps]
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-5)  # fp32 forward vs fp32 forward, fp64 softmax


def test_differentiable_with_the_reference_gradient(model, monkeypatch):
    prompts, comps = _samples(2, n=3)
    monkeypatch.setattr(L, "HEAD_CHUNK", 7)  # several checkpointed LM-head chunks, one spanning two samples
    model.zero_grad()
    sum(t.sum() for t in sequence_logprobs(model, prompts, comps)).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sum(t.sum() for t in _reference(model, prompts, comps)).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert got.keys() == ref.keys() and len(got) > 10
    for n in got:
        torch.testing.assert_close(got[n], ref[n].to(got[n].dtype), atol=1e-4, rtol=1e-3, msg=n)


def test_no_grad_and_chunking_give_the_same_values(model, monkeypatch):
    prompts, comps = _samples(3)
    with torch.no_grad():
        whole = sequence_logprobs(model, prompts, comps)
    monkeypatch.setattr(L, "HEAD_CHUNK", 5)
    with torch.inference_mode():
        chunked = sequence_logprobs(model, prompts, comps)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not b.requires_grad


def test_aligned_is_the_same_function_up_to_rounding(model):
    """Aligned mode changes the arithmetic (fixed-shape chunks, row blocks, fixed key order), not the maths."""
    prompts, comps = _samples(4, n=2)
    with torch.no_grad():
        a = sequence_logprobs(model, prompts, comps, numerics="aligned")
        d = sequence_logprobs(model, prompts, comps, numerics="default")
    assert max(float((x - y).abs().max()) for x, y in zip(a, d)) < 1e-4


@pytest.mark.parametrize("kwargs,match", [
    (dict(numerics="fast"), "numerics must be one of"),
    (dict(completions=[[5], []]), "completion 1 is empty"),
    (dict(prompts=[[], [3]]), "prompt 0 is empty"),
    (dict(completions=[[5], [384]]), "token id 384 is outside the vocabulary"),
    (dict(prompts=[[-1], [3]]), "token id -1 is outside"),
    (dict(completions=[[5]]), "2 prompts but 1 completions"),
    (dict(temperature=0.0), "temperature must be > 0"),
])
def test_errors(model, kwargs, match):
    args = dict(prompts=[[3, 4], [3]], completions=[[5], [6, 7]])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(model, **args)
