"""Samples of one prompt (`LLMEngine.add_group`: the server's n, GRPO's group) share one prefill: the others fork
from the first when its prompt is done. Each sample is BITWISE the same request run cold and alone (CPU)."""
import pytest

from ringlinear.engine import SamplingParams


def _params(n, **kw):
    base = dict(max_tokens=12, temperature=1.0, logprobs=True, ignore_eos=True)
    return [SamplingParams(seed=100 + i, **{**base, **kw}) for i in range(n)]


def _cold(make_llm, prompt, params, **kw):
    llm = make_llm(enable_prefix_caching=False, **kw)
    return [llm.generate([prompt], sp)[0] for sp in params]


def _count_tokens(eng, monkeypatch) -> list[int]:
    """Tokens the model computes per step (a shared prefill is computed once)."""
    counts = []
    run = eng.runner.execute

    def counting(batch):
        counts.append(batch.num_tokens)
        return run(batch)
    monkeypatch.setattr(eng.runner, "execute", counting)
    return counts


@pytest.mark.parametrize("numerics,P", [("default", 70), ("default", 64), ("aligned", 70)])
def test_n4_shares_one_prefill_and_equals_cold_runs(make_llm, random_prompts, run_engine, check_blocks,
                                                    monkeypatch, numerics, P):
    """P = 70: the prompt ends inside a block (each sample gets its own copy of it) and, in aligned numerics, inside
    a chunk (the open-chunk buffers are copied too); P = 64: whole blocks only."""
    prompt = random_prompts(1, P, P, seed=80)[0]
    params = _params(4)
    want = _cold(make_llm, prompt, params, numerics=numerics)
    eng = make_llm(numerics=numerics).engine
    counts = _count_tokens(eng, monkeypatch)
    rids = eng.add_group(prompt, params)
    assert eng.stats()["waiting"] == 4
    got = run_engine(eng, check_blocks)
    for rid, w in zip(rids, want):
        assert got[rid].token_ids == w.token_ids and got[rid].logprobs == w.logprobs
    assert len({tuple(got[r].token_ids) for r in rids}) > 1  # the seeds did sample different continuations
    # the prompt once, then every sample's tokens but its last (the first of each comes from the shared logits)
    assert sum(counts) == P + sum(len(got[r].token_ids) - 1 for r in rids)
    s = eng.stats()
    assert s["forked_requests"] == 3 and s["free_kv_blocks"] == s["total_kv_blocks"]
    assert s["free_state_slots"] == s["total_state_slots"] and all(r == 0 for r in eng.kv.allocator.ref)


def test_samples_without_a_free_slot_wait_as_ordinary_requests(make_llm, random_prompts, run_engine,
                                                               check_blocks):
    prompt = random_prompts(1, 150, 150, seed=81)[0]
    params = _params(4, max_tokens=6)
    want = _cold(make_llm, prompt, params)
    eng = make_llm(max_num_seqs=2).engine
    rids = eng.add_group(prompt, params)
    got = run_engine(eng, check_blocks)
    for rid, w in zip(rids, want):
        assert got[rid].token_ids == w.token_ids and got[rid].logprobs == w.logprobs
    s = eng.stats()
    # one fork fits beside the leader; the other two queue and resume from the snapshot at 128
    assert s["forked_requests"] == 1 and s["prefix_cache_hits"] == 2 and s["prefix_cache_hit_tokens"] == 256


def test_aborting_the_leader_or_a_waiting_sample(make_llm, random_prompts, run_engine, check_blocks):
    prompt = random_prompts(1, 150, 150, seed=82)[0]  # three prefill steps of 64
    params = _params(4)
    want = _cold(make_llm, prompt, params)
    eng = make_llm().engine
    rids = eng.add_group(prompt, params)
    eng.step()
    eng.abort_request(rids[0])  # mid-prefill: the first waiting sample becomes the leader
    eng.abort_request(rids[2])  # a sample still waiting on it
    assert eng.stats()["waiting"] == 2
    got = run_engine(eng, check_blocks)
    assert sorted(got) == [rids[1], rids[3]]
    for i in (1, 3):
        assert got[rids[i]].token_ids == want[i].token_ids and got[rids[i]].logprobs == want[i].logprobs
    s = eng.stats()
    assert s["forked_requests"] == 1 and s["aborted"] == 2
    assert s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"]


def test_one_token_samples_and_groups_without_prefix_caching(make_llm, random_prompts, run_engine):
    prompt = random_prompts(1, 40, 40, seed=83)[0]
    params = _params(3, max_tokens=1)
    eng = make_llm().engine
    eng.add_group(prompt, params)
    got = run_engine(eng)
    assert all(len(o.token_ids) == 1 for o in got.values()) and eng.stats()["forked_requests"] == 2
    assert eng.stats()["free_state_slots"] == eng.stats()["total_state_slots"]
    off = make_llm(enable_prefix_caching=False).engine  # no sharing at all: independent requests
    rids = off.add_group(prompt, _params(3))
    got_off = run_engine(off)
    assert off.stats()["forked_requests"] == 0
    assert [got_off[r].token_ids for r in rids] == [o.token_ids for o in _cold(make_llm, prompt, _params(3))]
