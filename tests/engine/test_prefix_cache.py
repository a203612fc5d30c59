"""Prefix caching: a request resumed from cached KV blocks and a state snapshot gives BITWISE the tokens and
log-probs of the same request run cold (CPU, where the engine is batch invariant; docs/serving.md), under
eviction, preemption and in aligned numerics; the counters say what happened; memory comes back."""
import pytest

from ringlinear.engine import EngineConfig, SamplingParams
from ringlinear.engine.prefix_cache import SnapshotPool

# make_llm's engine: prefill_chunk 64, block_size 16, so snapshots every 64 tokens (lcm of the two).


def _same(a, b):
    assert a.token_ids == b.token_ids
    assert a.logprobs == b.logprobs            # float ==: bitwise
    assert a.top_logprobs == b.top_logprobs


def _cold(make_llm, prompts, params, **kw):
    """Each request alone on an engine without prefix caching."""
    llm = make_llm(enable_prefix_caching=False, **kw)
    return [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]


def _snapshot_bytes(make_llm) -> int:
    cfg = make_llm(enable_prefix_caching=False, max_num_seqs=1).engine.model_config
    return SnapshotPool.bytes_per_snapshot(len(cfg.linear_layers), cfg.num_attention_heads, cfg.head_dim_)


def test_shared_system_prompt_hits_equal_cold_runs_bitwise(make_llm, random_prompts, run_engine, check_blocks):
    system = random_prompts(1, 200, 200, seed=70)[0]
    users = random_prompts(6, 2, 90, seed=71)
    # the last one: 192 + 1 tokens, so the resumed piece is a single token (the decode kernels, as cold)
    prompts = [system + u for u in users] + [system[:192] + users[0][:1]]
    params = [SamplingParams(max_tokens=10, temperature=0 if i % 2 else 0.9, seed=i, top_logprobs=3,
                             ignore_eos=True) for i in range(len(prompts))]
    want = _cold(make_llm, prompts, params)
    eng = make_llm().engine
    eng.add_request(prompts[0], params[0], "r0")
    got = run_engine(eng, check_blocks)          # the first one fills the cache: snapshots at 64, 128, 192, ...
    assert eng.stats()["prefix_cache_hits"] == 0 and eng.stats()["snapshots"] >= 3
    for i in range(1, len(prompts)):             # the rest at once: all resume at 192 (block 12 differs)
        eng.add_request(prompts[i], params[i], f"r{i}")
    got.update(run_engine(eng, check_blocks))
    for i, w in enumerate(want):
        _same(got[f"r{i}"], w)
    s = eng.stats()
    assert s["prefix_cache_queries"] == len(prompts)
    assert s["prefix_cache_hits"] == len(prompts) - 1
    assert s["prefix_cache_hit_tokens"] == 192 * (len(prompts) - 1)
    assert s["cached_blocks"] > 0 and s["snapshot_bytes"] == s["snapshots"] * eng.prefix_cache.snapshots.bytes_each
    assert s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"]
    assert all(r == 0 for r in eng.kv.allocator.ref)


def _conversation(make_llm, run_engine, first, users, sp, **kw):
    """Turn t's prompt: the conversation so far (previous prompt + its answer) + users[t]. -> outputs, the hit
    of every turn (tokens resumed from the cache), the prompt lengths."""
    eng = make_llm(**kw).engine
    outs, hits, lens = [], [], []
    prompt = first
    for t, u in enumerate(users):
        before = eng.stats()["prefix_cache_hit_tokens"]
        eng.add_request(prompt, sp, f"t{t}")
        outs.append(run_engine(eng)[f"t{t}"])
        hits.append(eng.stats()["prefix_cache_hit_tokens"] - before)
        lens.append(len(prompt))
        prompt = prompt + outs[-1].token_ids + u
    return outs, hits, lens


@pytest.mark.parametrize("numerics", ["default", "aligned"])
def test_multi_turn_continuations_hit_and_equal_cold_runs(make_llm, random_prompts, run_engine, numerics):
    first = random_prompts(1, 120, 120, seed=72)[0]
    users = random_prompts(3, 25, 40, seed=73)  # appended after turns 0 and 1 (the last is not used)
    sp = SamplingParams(max_tokens=20, temperature=0.8, seed=3, logprobs=True, ignore_eos=True)
    outs, hits, lens = _conversation(make_llm, run_engine, first, users, sp, numerics=numerics)
    cold, _, _ = _conversation(make_llm, run_engine, first, users, sp, numerics=numerics,
                               enable_prefix_caching=False)
    for a, b in zip(outs, cold):
        _same(a, b)
    # Where a turn resumes: default numerics caches what full prefill pieces computed (up to the previous
    # prompt's last multiple of 64), aligned numerics also what decode steps did (the previous answer too: its
    # last computed token is the one before the last sampled one).
    cached = [L // 64 * 64 if numerics == "default" else (L + 20 - 1) // 64 * 64 for L in lens]
    assert hits == [0] + cached[:-1]
    if numerics == "aligned":
        assert any(L + 19 >= L // 64 * 64 + 64 for L in lens[:-1])  # the answer did cross a boundary


def test_eviction_under_a_tiny_budget_keeps_every_request_correct(make_llm, random_prompts, run_engine,
                                                                 check_blocks):
    families = random_prompts(4, 130, 130, seed=74)
    users = random_prompts(16, 1, 60, seed=75)
    order = [0, 0, 1, 1, 2, 0, 3, 1, 2, 2, 3, 3, 0, 1, 0, 2]  # repeats near and far: some hit, some were evicted
    prompts = [families[f] + u for f, u in zip(order, users)]
    params = [SamplingParams(max_tokens=8, temperature=0.7, seed=i, logprobs=True, ignore_eos=True)
              for i in range(len(prompts))]
    want = _cold(make_llm, prompts, params)
    probe = _snapshot_bytes(make_llm)
    # 3 snapshots; 40 blocks of 16 tokens: 3 requests of <= 13 blocks run, the cache lives in what is left
    eng = make_llm(max_num_seqs=3, num_kv_blocks=40, state_snapshot_bytes=3 * probe).engine

    def check(e):
        check_blocks(e)
        assert e.stats()["snapshots"] <= 3

    got = {}
    for wave in range(0, len(prompts), 4):  # waves, so later ones find (and lose) what earlier ones cached
        for i in range(wave, wave + 4):
            eng.add_request(prompts[i], params[i], f"r{i}")
        got.update(run_engine(eng, check))
    s = eng.stats()
    assert s["preemptions"] == 0  # so bitwise is the claim (a preempted request's recompute is not bitwise)
    assert s["prefix_cache_hits"] > 0 and s["evicted_blocks"] > 0 and s["evicted_snapshots"] > 0
    for i, w in enumerate(want):
        _same(got[f"r{i}"], w)
    assert s["free_kv_blocks"] == s["total_kv_blocks"] and all(r == 0 for r in eng.kv.allocator.ref)


def test_preemption_with_shared_blocks(make_llm, random_prompts, run_engine, check_blocks):
    """Prefix hits and forked samples under memory pressure: requests holding shared blocks get preempted and
    recompute; reference counts stay exact after every step and every block comes back."""
    system = random_prompts(1, 70, 70, seed=76)[0]
    users = random_prompts(4, 5, 40, seed=77)
    params = [SamplingParams(max_tokens=40, temperature=0.9, seed=10 + i, logprobs=True, ignore_eos=True)
              for i in range(3)]
    ample = make_llm(enable_prefix_caching=False, max_num_seqs=12, num_kv_blocks=512, block_size=8)
    want = {}
    for j, u in enumerate(users):
        for i, sp in enumerate(params):
            want[f"u{j}-{i}"] = ample.generate([system + u], sp)[0]
    eng = make_llm(max_num_seqs=12, num_kv_blocks=40, block_size=8).engine  # ~320 tokens of KV for ~1700
    for j, u in enumerate(users):
        eng.add_group(system + u, params, [f"u{j}-{i}" for i in range(3)])
    got = run_engine(eng, check_blocks)
    s = eng.stats()
    assert s["preemptions"] > 0 and s["forked_requests"] > 0
    for rid, w in want.items():  # preempted requests recompute through prefill: same tokens, log-probs ~1e-6
        assert got[rid].token_ids == w.token_ids
        assert max(abs(x - y) for x, y in zip(got[rid].logprobs, w.logprobs)) < 1e-4
    assert s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"]
    assert all(r == 0 for r in eng.kv.allocator.ref)


def test_reset_and_sleep_forget_the_cache(make_llm, random_prompts):
    llm = make_llm()
    eng = llm.engine
    p = random_prompts(1, 150, 150, seed=78)[0]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([p], sp)
    assert eng.stats()["cached_blocks"] > 0 and eng.stats()["snapshots"] > 0
    eng.sleep()  # cached blocks are idle: sleep drops them with the storage
    eng.wake()
    s = eng.stats()
    assert s["cached_blocks"] == s["snapshots"] == 0 and s["free_kv_blocks"] == s["total_kv_blocks"]
    llm.generate([p], sp)
    assert eng.stats()["prefix_cache_hits"] == 0  # nothing survived the sleep
    llm.generate([p], sp)
    assert eng.stats()["prefix_cache_hits"] == 1
    eng.reset_prefix_cache()
    llm.generate([p], sp)
    assert eng.stats()["prefix_cache_hits"] == 1


def test_snapshot_interval_config():
    assert EngineConfig().state_snapshot_interval == 512
    assert EngineConfig(prefill_chunk=64, block_size=48).state_snapshot_interval == 192
    assert EngineConfig(prefill_chunk=256, state_snapshot_interval=1024).state_snapshot_interval == 1024
    with pytest.raises(ValueError, match="multiple of 256"):
        EngineConfig(prefill_chunk=256, state_snapshot_interval=384)
    with pytest.raises(ValueError, match="state_snapshot_bytes"):
        EngineConfig(state_snapshot_bytes=-1)


def _queued_burst(make_llm, random_prompts, n, max_tokens, seed):
    """n greedy requests sharing a 320-token system prompt, all queued at once on a fresh engine ->
    (prompts, their cold-run outputs, the engine)."""
    system = random_prompts(1, 320, 320, seed=seed)[0]
    prompts = [system + u for u in random_prompts(n, 5, 40, seed=seed + 1)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=True, ignore_eos=True) for _ in prompts]
    want = _cold(make_llm, prompts, params)
    eng = make_llm().engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(p, sp, f"r{i}")
    return prompts, want, eng


def test_a_burst_waits_for_the_prefix_being_computed(make_llm, random_prompts, run_engine, check_blocks):
    """Requests sharing a system prompt, all queued at once: the first computes it, the others wait for its
    snapshots instead of computing the same tokens beside it, then resume from them; outputs equal cold runs
    bitwise. Without the wait every one of them would miss (nothing is cached when they are admitted)."""
    prompts, want, eng = _queued_burst(make_llm, random_prompts, n=5, max_tokens=6, seed=80)
    got = run_engine(eng, check_blocks)
    for i, w in enumerate(want):
        _same(got[f"r{i}"], w)
    s = eng.stats()
    assert s["prefix_cache_waits"] == len(prompts) - 1
    assert s["prefix_cache_hits"] == len(prompts) - 1
    assert s["prefix_cache_hit_tokens"] == 320 * (len(prompts) - 1)  # every boundary up to the shared 320
    assert not eng.prefix_cache.in_flight and s["free_kv_blocks"] == s["total_kv_blocks"]


def test_waiting_requests_go_on_when_the_prefill_they_wait_for_stops(make_llm, random_prompts, run_engine,
                                                                     check_blocks):
    """The request computing the shared prefix is aborted mid-prefill: the ones waiting for it are admitted
    (from what it cached so far) and finish with the cold run's outputs."""
    prompts, want, eng = _queued_burst(make_llm, random_prompts, n=3, max_tokens=4, seed=82)
    eng.step()
    eng.step()                                   # r0 has computed 2 of its pieces; r1, r2 wait for the third
    assert eng.stats()["running"] == 1 and eng.stats()["prefix_cache_waits"] == 2
    eng.abort_request("r0")
    got = run_engine(eng, check_blocks)
    assert set(got) == {"r1", "r2"}
    for i in (1, 2):
        _same(got[f"r{i}"], want[i])
    assert not eng.prefix_cache.in_flight
