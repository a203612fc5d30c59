"""Prompt log-probs (`SamplingParams.prompt_logprobs`, the server's echo + logprobs): computed in the prefill from
every prompt position of the request's pieces, equal to a full forward's fp32 log-softmax, bitwise the same alone
and batched (CPU: batch-invariant), never rescored after a preemption, and in aligned numerics bitwise equal to the
trainer's `sequence_logprobs`."""
import torch

from ringlinear.engine import SamplingParams
from ringlinear.rl import sequence_logprobs

LENGTHS = (1, 2, 63, 64, 65, 130, 200)  # around the 64-token prefill piece: the positions that end a piece score too


def _full_forward(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # [P, V]: row j scores token j + 1


def test_prompt_logprobs_equal_the_full_forward(make_llm, random_prompts):
    llm = make_llm()
    prompts = [random_prompts(1, n, n, seed=30 + n)[0] for n in LENGTHS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=3))
    for p, o in zip(prompts, outs):
        assert o.token_ids == [] and o.finish_reason == "length" and o.text == ""
        assert len(o.prompt_logprobs) == len(o.prompt_top_logprobs) == len(p)
        assert o.prompt_logprobs[0] is None and o.prompt_top_logprobs[0] is None
        if len(p) == 1:
            continue
        ref = _full_forward(llm.engine.model, p)
        want = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        # Not bitwise: the engine's fixed-row-block GEMMs and paged kernels vs the plain forward (docs/serving.md).
        torch.testing.assert_close(torch.tensor(o.prompt_logprobs[1:]), want, atol=1e-5, rtol=0)
        for j, top in enumerate(o.prompt_top_logprobs[1:]):
            vals, ids = ref[j].topk(3)
            assert [t for t, _ in top] == ids.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in top]), vals, atol=1e-5, rtol=0)
    assert llm.engine.stats()["running"] == 0


def test_prompt_logprobs_with_generation_and_batch_invariance(make_llm, random_prompts):
    llm = make_llm()
    target = random_prompts(1, 150, 150, seed=40)[0]
    sp = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=2, logprobs=True, ignore_eos=True)
    alone = llm.generate([target], sp)[0]
    assert len(alone.token_ids) == 8 and len(alone.prompt_logprobs) == 150
    others = random_prompts(5, 1, 220, seed=41)
    other_sp = [SamplingParams(max_tokens=10, temperature=0.7, seed=i, prompt_logprobs=0 if i % 2 else None)
                for i in range(5)]
    mixed = llm.generate(others[:3] + [target] + others[3:], other_sp[:3] + [sp] + other_sp[3:])[3]
    assert mixed.prompt_logprobs == alone.prompt_logprobs            # float ==: bitwise
    assert mixed.prompt_top_logprobs == alone.prompt_top_logprobs
    assert (mixed.token_ids, mixed.logprobs) == (alone.token_ids, alone.logprobs)
    # a request that does not ask gets none
    plain = llm.generate([target], SamplingParams(max_tokens=2, temperature=0))[0]
    assert plain.prompt_logprobs is None and plain.prompt_top_logprobs is None


def test_preempted_requests_are_not_rescored(make_llm, random_prompts):
    prompts = random_prompts(8, 60, 120, seed=42)
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, prompt_logprobs=1) for _ in prompts]
    ref = make_llm(max_num_seqs=8, num_kv_blocks=512, block_size=8).generate(prompts, params)
    tight = make_llm(max_num_seqs=8, num_kv_blocks=24, block_size=8)
    out = tight.generate(prompts, params)
    assert sum(o.num_preemptions for o in out) > 0
    for a, b, p in zip(ref, out, prompts):
        assert len(b.prompt_logprobs) == len(p) and b.prompt_logprobs == a.prompt_logprobs
        assert b.token_ids == a.token_ids


def test_aligned_prompt_logprobs_equal_sequence_logprobs_bitwise(tiny_dir, random_prompts):
    from ringlinear.engine import LLM
    llm = LLM(tiny_dir, device="cpu", numerics="aligned", max_num_seqs=4, num_kv_blocks=256, prefill_chunk=64,
              max_num_batched_tokens=256)
    prompts = random_prompts(4, 2, 180, seed=43)
    outs = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=0))
    with torch.no_grad():
        train = sequence_logprobs(llm.engine.model, [p[:1] for p in prompts], [p[1:] for p in prompts],
                                  numerics="aligned")
    for o, t in zip(outs, train):
        assert torch.equal(torch.tensor(o.prompt_logprobs[1:], dtype=torch.float32), t)


def test_prompt_logprobs_score_every_position_despite_a_cached_prefix(make_llm, random_prompts):
    """A cache hit would skip the cached positions' prefill, so a request scoring its prompt never takes one, and
    its n samples each prefill (no fork): every sample's prompt log-probs equal a cold request's."""
    llm = make_llm()
    p = random_prompts(1, 1100, 1100, seed=91)[0]                        # past the 512-token snapshot interval
    llm.generate([p], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))   # leaves a snapshot
    cold = make_llm(enable_prefix_caching=False).generate([p], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    hits = llm.engine.stats()["prefix_cache_hits"]
    eng = llm.engine
    rids = eng.add_group(p, [SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, ignore_eos=True)] * 2)
    done = {}
    while eng.has_unfinished():
        done.update((o.request_id, o) for o in eng.step() if o.finished)
    assert eng.stats()["prefix_cache_hits"] == hits and eng.stats()["forked_requests"] == 0
    for r in rids:
        assert done[r].prompt_logprobs == cold.prompt_logprobs
