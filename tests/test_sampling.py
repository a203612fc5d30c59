"""The one sampling struct: its checks name the parameter, it is frozen, and every entry point builds it."""
import dataclasses
import math

import pytest
import torch

from ringlinear.engine.sampling_params import SamplingParams
from ringlinear.sampling import Sampling, SamplingParamError, make_generator, sample


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
