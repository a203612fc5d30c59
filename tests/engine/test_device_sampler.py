"""The batched sampler (`sampling.sample_batch`, the engine's GPU path) against the one-row sampler `sample`
(the CPU path and generate()'s): the same tokens from the same generators, row by row, whatever the batch; and the
engine's device-path log-probs against the CPU path's. Runs on the CPU (the functions take any device) and on
CUDA where present."""
import math
import random

import pytest
import torch

from ringlinear.engine.sampler import sample_rows, sample_sequences
from ringlinear.engine.sampling_params import SamplingParams
from ringlinear.engine.sequence import Sequence
from ringlinear.sampling import Sampling, make_generator, sample, sample_batch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params(rng: random.Random, cls=Sampling, **extra):
    kinds = [dict(temperature=0.0), dict(), dict(temperature=0.6), dict(top_k=5), dict(top_k=1),
             dict(top_p=0.7), dict(top_p=0.95, temperature=1.3), dict(min_p=0.1), dict(min_p=1.0),
             dict(top_k=40, top_p=0.8, min_p=0.02, temperature=0.8), dict(top_k=10 ** 6)]
    return cls(seed=rng.randrange(2 ** 32), **rng.choice(kinds), **extra)


def _logits(n, V, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, V, generator=g) * 3).to(device)
    x[0, torch.arange(V) % 3 != 0] = -math.inf  # a grammar-masked row
    return x


@pytest.mark.parametrize("device", DEVICES)
def test_batched_draws_equal_one_row_draws(device):
    seed = random.randrange(10 ** 6)
    rng = random.Random(seed)
    n, V = 37, 3000
    x = _logits(n, V, seed, device)
    params = [_params(rng) for _ in range(n)]
    for step in range(3):  # generators advance one draw per sampled row per step, as in decoding
        g_one = [make_generator(p.seed + step) for p in params]
        g_all = [make_generator(p.seed + step) for p in params]
        one = [sample(x[i], p, g) for i, (p, g) in enumerate(zip(params, g_one))]
        got = sample_batch(x, params, g_all, rows_per_chunk=8)
        assert got.device.type == device and got.tolist() == one, f"seed {seed} step {step}"
        assert [g.get_state().tolist() for g in g_one] == [g.get_state().tolist() for g in g_all]
    assert all(t % 3 == 0 for t in got[:1].tolist())  # the masked row drew an allowed token


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_token_does_not_depend_on_its_batch(device):
    seed = random.randrange(10 ** 6)
    rng = random.Random(seed)
    x = _logits(20, 2048, seed, device)
    params = [_params(rng) for _ in range(20)]
    full = sample_batch(x, params, [make_generator(p.seed) for p in params]).tolist()
    for i in rng.sample(range(20), 5):
        alone = sample_batch(x[i:i + 1], params[i:i + 1], [make_generator(params[i].seed)]).tolist()
        assert alone == [full[i]], f"seed {seed} row {i}"


@pytest.mark.parametrize("aligned", [False, True])
def test_engine_device_path_equals_the_row_path(aligned):
    """`sample_sequences` (what a GPU step runs) on CPU tensors against `sample_rows`' CPU path: equal tokens,
    log-probs within 1e-6, the same top-k ids."""
    seed = random.randrange(10 ** 6)
    n, V = 12, 1500
    x = _logits(n, V, seed, "cpu")

    def seqs():
        r = random.Random(seed)
        return [Sequence(str(i), [3, 4, 5], _params(r, SamplingParams, logprobs=r.random() < 0.7,
                                                top_logprobs=r.choice([0, 0, 3, 5]),
                                                tempered_logprobs=r.random() < 0.5), None, 4096)
                for i in range(n)]
    ref, dev = sample_rows(x, seqs(), aligned=aligned), sample_sequences(x, x, seqs(), aligned)
    assert [r[0] for r in ref] == [d[0] for d in dev], f"seed {seed}"
    for r, d in zip(ref, dev):
        assert (r[1] is None) == (d[1] is None) and (r[1] is None or abs(r[1] - d[1]) <= 1e-6), f"seed {seed}"
        assert (r[2] is None) == (d[2] is None)
        if r[2]:
            assert [t for t, _ in r[2]] == [t for t, _ in d[2]]
            assert max(abs(a - b) for (_, a), (_, b) in zip(r[2], d[2])) <= 1e-6
