"""Memory pressure: preemption by recompute gives the same outputs as ample memory, and frees everything."""
from ringlinear.engine import SamplingParams


def test_preemption_keeps_outputs(make_llm, random_prompts):
    prompts = random_prompts(10, 20, 120, seed=20)
    params = [SamplingParams(max_tokens=40, temperature=0 if i % 2 == 0 else 0.8, seed=i, ignore_eos=True,
                             logprobs=True) for i in range(10)]
    ample = make_llm(max_num_seqs=10, num_kv_blocks=512, block_size=8)
    ref = ample.generate(prompts, params)
    assert ample.engine.scheduler.num_preemptions == 0
    # 24 blocks x 8 = 192 tokens of KV: one request fits (<= 160 tokens), all ten (~1100) do not.
    tight = make_llm(max_num_seqs=10, num_kv_blocks=24, block_size=8)
    out = tight.generate(prompts, params)
    eng = tight.engine
    assert eng.scheduler.num_preemptions > 0
    assert sum(o.num_preemptions for o in out) > 0
    for a, b in zip(ref, out):
        # Recomputed tokens go through the prefill kernels instead of decode: tokens equal, log-probs within
        # fp32 rounding (not bitwise: a different, equally exact, evaluation order).
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    s = eng.stats()
    assert s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"]


def test_slots_limit_running_requests(make_llm, random_prompts):
    llm = make_llm(max_num_seqs=2)
    eng = llm.engine
    for i, p in enumerate(random_prompts(5, 10, 30, seed=21)):
        eng.add_request(p, SamplingParams(max_tokens=6, temperature=0), f"r{i}")
    peak = 0
    done = 0
    while eng.has_unfinished():
        done += sum(o.finished for o in eng.step())
        peak = max(peak, len(eng.scheduler.running))
    assert peak == 2 and done == 5
