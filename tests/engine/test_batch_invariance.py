"""A request's tokens and log-probs are BITWISE the same alone and alongside other requests (docs/numerics.md)."""
import torch
import torch.nn.functional as F

from ringlinear.engine import SamplingParams
from ringlinear.ops.linear import RowBlockMode, row_block_linear


def _run(llm, target, target_params, others, other_params, position):
    prompts = others[:position] + [target] + others[position:]
    params = other_params[:position] + [target_params] + other_params[position:]
    return llm.generate(prompts, params)[position]


def test_greedy_alone_vs_with_seven_others_bitwise(make_llm, random_prompts):
    llm = make_llm(max_num_seqs=8, num_kv_blocks=512, prefill_chunk=64, max_num_batched_tokens=256)
    target = random_prompts(1, 150, 150, seed=10)[0]
    sp = SamplingParams(max_tokens=32, temperature=0, top_logprobs=4, ignore_eos=True)
    alone = llm.generate([target], sp)[0]
    others = random_prompts(7, 1, 300, seed=11)
    assert len({len(o) for o in others} | {len(target)}) == 8  # all lengths differ
    other_sp = [SamplingParams(max_tokens=n, temperature=t, seed=n, ignore_eos=True)
                for n, t in zip((5, 40, 12, 33, 20, 8, 27), (0, 0.7, 1.0, 0, 0.5, 1.0, 0))]
    for pos in (0, 3, 7):
        mixed = _run(llm, target, sp, others, other_sp, pos)
        assert mixed.token_ids == alone.token_ids
        assert mixed.logprobs == alone.logprobs          # float ==: bitwise
        assert mixed.top_logprobs == alone.top_logprobs


def test_seeded_sampling_alone_vs_batched_bitwise(make_llm, random_prompts):
    llm = make_llm()
    target = random_prompts(1, 70, 70, seed=12)[0]
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=7, logprobs=True)
    alone = llm.generate([target], sp)[0]
    others = random_prompts(5, 1, 140, seed=13)
    mixed = _run(llm, target, sp, others, [SamplingParams(max_tokens=15, temperature=0)] * 5, 2)
    assert (mixed.token_ids, mixed.logprobs) == (alone.token_ids, alone.logprobs)


def test_row_block_linear_row_independent_of_batch():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    x = torch.randn(70, 64, generator=g)
    alone = row_block_linear(x[5:6], w)
    for m in (6, 16, 17, 33, 70):
        assert torch.equal(row_block_linear(x[:m], w)[5:6], alone)
    torch.testing.assert_close(row_block_linear(x, w), F.linear(x, w))


def test_mode_makes_activations_position_independent():
    # fp32 sigmoid/silu: SIMD body vs scalar tail round differently; under the mode every element is SIMD.
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    with RowBlockMode(16):
        full_sig, full_silu = torch.sigmoid(x), F.silu(x)
        for n in (1, 3, 35, 100, 999):
            for off in (0, 1, 29):
                assert torch.equal(torch.sigmoid(x[off:off + n]), full_sig[off:off + n])
                assert torch.equal(F.silu(x[off:off + n]), full_silu[off:off + n])
                assert torch.equal(x[off:off + n].sigmoid(), full_sig[off:off + n])
