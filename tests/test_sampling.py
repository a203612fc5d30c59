"""The one sampling struct: its checks name the parameter, it is frozen, and every entry point builds it."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from ringlinear.engine.sampling_params import SamplingParams
from ringlinear.sampling import (Sampling, SamplingParamError, TokenHistory, _filtered_probs, make_generator,
                                 process_logits, sample)


@pytest.mark.parametrize("kw,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": 1e308}, "temperature"),
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"),
])
def test_every_value_checked_and_named(kw, param):
    for cls in (Sampling, SamplingParams):
        with pytest.raises(SamplingParamError) as e:
            cls(**kw)
        assert e.value.param == param and param in str(e.value)
    with pytest.raises(SamplingParamError, match="top_logprobs"):
        SamplingParams(top_logprobs=21)


def test_frozen_defaults_and_greedy():
    sp = SamplingParams(stop="END", top_logprobs=2)
    assert sp.stop == ["END"] and sp.logprobs  # normalised when built
    with pytest.raises(dataclasses.FrozenInstanceError):
        sp.temperature = 0.0
    assert SamplingParams().temperature == Sampling().temperature == 1.0  # one default, everywhere
    assert Sampling(temperature=0).greedy and Sampling(temperature=1e-7).greedy and not Sampling().greedy
    assert isinstance(sp, Sampling)  # the engine's params are a Sampling: sample() takes either


def test_sample_greedy_ties_and_seeded_draws():
    logits = torch.tensor([1.0, 3.0, 3.0, -2.0])
    assert sample(logits, Sampling(temperature=0)) == 1  # lowest index wins a tie
    draws = [sample(logits, Sampling(top_k=3), make_generator(7)) for _ in range(2)]
    assert draws[0] == draws[1]  # same seed, same token
    assert all(sample(logits, Sampling(top_k=2), make_generator(s)) in (1, 2) for s in range(20))
    assert make_generator(2**64 + 5).initial_seed() == 5  # derived seeds (seed + i) wrap modulo 2**64


def test_generate_flags_default_to_the_struct():
    from ringlinear.cli import build_parser
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "x"])
    assert (args.temperature, args.top_k, args.top_p) == (None, None, None)  # None: Sampling's defaults apply


# ---------------------------------------------------------------------- penalties, bias, min_p
@pytest.mark.parametrize("kw,param", [
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.5}, "min_p"), ({"min_p": math.nan}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"presence_penalty": math.inf}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"), ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": 11.0}, "repetition_penalty"), ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"), ({"logit_bias": {"5": 101.0}}, "logit_bias"),
    ({"logit_bias": {"5": math.nan}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"-1": 1.0}}, "logit_bias"), ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {"5": 1.0, 5: 2.0}}, "logit_bias"), ({"logit_bias": {"5": True}}, "logit_bias"),
])
def test_new_options_checked_and_named(kw, param):
    for cls in (Sampling, SamplingParams):
        with pytest.raises(SamplingParamError) as e:
            cls(**kw)
        assert e.value.param == param and param in str(e.value)


def test_logit_bias_keys_normalised_and_vocab_checked():
    s = Sampling(logit_bias={"7": -100, 3: 2.5})
    assert s.logit_bias == {7: -100.0, 3: 2.5}
    assert Sampling(logit_bias={}).logit_bias is None and not Sampling(logit_bias={}).processes_logits
    s.check_vocab(8)
    with pytest.raises(SamplingParamError, match="logit_bias") as e:
        s.check_vocab(7)
    assert e.value.param == "logit_bias"


def _row(V=200, seed=0):
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 4


def _reference(x, bias, prompt, out, r, presence, frequency):
    """The rule of `ringlinear.sampling` written out with numpy fp32 scalars, one token at a time."""
    y = x.numpy().astype(np.float32).copy()
    for t, b in (bias or {}).items():
        y[t] = y[t] + np.float32(b)
    for t in set(prompt) | set(out):
        y[t] = y[t] / np.float32(r) if y[t] > 0 else y[t] * np.float32(r)
    for t in set(out):
        c = np.float32(out.count(t))
        y[t] = y[t] - (np.float32(frequency) * c + np.float32(presence))
    return y


@pytest.mark.parametrize("kw", [
    {"logit_bias": {"3": 5.5, "17": -100.0, "199": 0.25}},
    {"repetition_penalty": 1.3}, {"repetition_penalty": 0.7},
    {"presence_penalty": 0.6}, {"frequency_penalty": -1.1}, {"presence_penalty": 1.5, "frequency_penalty": 0.35},
    {"logit_bias": {"4": 3.0}, "repetition_penalty": 1.7, "presence_penalty": -0.4, "frequency_penalty": 0.9},
])
def test_process_logits_equals_the_written_rule_bitwise(kw):
    g = torch.Generator().manual_seed(1)
    x = _row()
    prompt = torch.randint(0, 200, (30,), generator=g).tolist()
    out: list[int] = []
    s = Sampling(**kw)
    hist = TokenHistory(prompt, out)
    for step in range(6):  # the history folds in tokens appended between calls
        got = process_logits(x, s, hist)
        want = _reference(x, s.logit_bias, prompt, out, s.repetition_penalty, s.presence_penalty,
                          s.frequency_penalty)
        assert np.array_equal(got.numpy(), want), step  # fp32 arithmetic, same operations: bitwise
        # and the exact maths (fp64) within fp32 rounding
        y = x.double().numpy().copy()
        for t, b in (s.logit_bias or {}).items():
            y[t] += b
        for t in set(prompt) | set(out):
            y[t] = y[t] / s.repetition_penalty if y[t] > 0 else y[t] * s.repetition_penalty
        for t in set(out):
            y[t] -= s.frequency_penalty * out.count(t) + s.presence_penalty
        np.testing.assert_allclose(got.double().numpy(), y, rtol=1e-6, atol=1e-5)
        out += torch.randint(0, 200, (3,), generator=g).tolist() + [out[0] if out else 5]  # repeats
    assert torch.equal(x, _row())  # the input row (whose log-probs are reported) is untouched


def test_min_p_keeps_tokens_against_a_hand_computation():
    x = _row(seed=2)
    for T, min_p, top_k in ((1.0, 0.05, 0), (0.7, 0.2, 0), (1.5, 0.01, 10), (1.0, 1.0, 0)):
        probs, idx = _filtered_probs(x, Sampling(temperature=T, min_p=min_p, top_k=top_k))
        p = np.exp(x.double().numpy() / T - (x.double().numpy() / T).max())
        p /= p.sum()
        keep = p >= min_p * p.max()
        if top_k:
            keep &= p >= np.sort(p)[-top_k]
        assert set(idx.tolist()) == set(np.nonzero(keep)[0].tolist())
        np.testing.assert_allclose(probs.numpy(), p[idx.numpy()] / p[keep].sum(), rtol=1e-12)
    # min_p = 1 keeps only the most likely token: sampling is then greedy whatever the seed
    top = int(torch.argmax(x))
    assert all(sample(x, Sampling(min_p=1.0), make_generator(s)) == top for s in range(10))


def test_masked_tokens_are_never_drawn():
    x = _row(seed=3)
    x[torch.arange(200) % 3 != 0] = -math.inf
    assert all(sample(x, Sampling(temperature=1.5), make_generator(s)) % 3 == 0 for s in range(30))


def test_generate_flags_reach_sampling(tmp_path, capsys):
    from ringlinear.cli import main
    from ringlinear.models.tokenizer import load_tokenizer
    from ringlinear.testing import make_tiny_checkpoint
    d = make_tiny_checkpoint(str(tmp_path / "tiny"))
    token = load_tokenizer(d).decode([77])
    assert main(["generate", "--model", d, "--prompt", "P:", "--max-new-tokens", "4", "--device", "cpu",
                 "--logit-bias", "77=100", "--repetition-penalty", "1.2", "--min-p", "0.1"]) == 0
    assert capsys.readouterr().out == "P:" + token * 4 + "\n"  # +100 outweighs the penalty on a repeat
