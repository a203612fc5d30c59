"""The CUDA-graph prefill step (static buffers, tokens padded to a bucket, piece slots padded with empty
sequences) run eagerly on CPU: the same tokens and log-probs as the eager engine, and padding that writes only
scratch memory. This checks its logic without a GPU; capture itself needs CUDA."""
import pytest
import torch

from ringlinear.engine import SamplingParams
from ringlinear.engine.prefill_graph import MAX_GRAPH_TOKENS, PrefillGraphs, StaticPrefillStep, prefill_buckets



def _static(eng, buckets=(64, 128, 256), slots=(1, 2, 4, 8)):
    step = StaticPrefillStep(eng.model, eng.kv, eng.states, max(buckets), list(slots), eng.runner.device)
    return PrefillGraphs(step, list(buckets), capture=False)


def _run(eng, prompts, params, run_engine):
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(p, sp, f"r{i}")
    return run_engine(eng)


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", ["fresh", 0])
def test_static_prefill_matches_the_eager_engine(make_llm, random_prompts, run_engine, caching, seed):
    """caching: prompts share a 128-token system prefix, so later requests hit the cache (snapshots taken after
    static steps) and take the eager path from there. Seed 0 with caching differed (an MoE row in the last bits)
    while the static path ran outside the runner's batch-invariant mode."""
    seed = int(torch.randint(0, 10**6, (1,))) if seed == "fresh" else seed
    prompts = random_prompts(6, 2, 150, seed=seed)
    if caching:
        system = random_prompts(1, 128, 128, seed=seed + 1)[0]
        prompts = [system + p for p in prompts]
    params = [SamplingParams(max_tokens=5, temperature=0.9 if i % 2 else 0.0, seed=i, logprobs=True,
                             ignore_eos=True) for i in range(len(prompts))]
    want = _run(make_llm(enable_prefix_caching=caching).engine, prompts, params, run_engine)

    eng = make_llm(enable_prefix_caching=caching).engine
    graphs = _static(eng)
    used = []
    orig = graphs.step.forward

    def spy(T, S):
        used.append((T, S))
        return orig(T, S)
    graphs.step.forward = spy
    eng.runner.prefill_graphs = graphs
    got = _run(eng, prompts, params, run_engine)
    assert used, "no step took the static prefill path"
    if not caching:  # (with caching the others wait for the first prompt's prefix, then hit it)
        assert any(S > 1 for _, S in used) and any(T > 64 for T, _ in used), used  # both kinds of padding
    for rid, w in want.items():
        assert got[rid].token_ids == w.token_ids and got[rid].logprobs == w.logprobs, rid
    if caching:
        assert eng.stats()["prefix_cache_hits"] > 0


def test_padding_writes_only_scratch(make_llm, random_prompts):
    eng = make_llm(enable_prefix_caching=False).engine
    eng.add_request(random_prompts(1, 40, 40, seed=3)[0], SamplingParams(max_tokens=2, ignore_eos=True), "a")
    batch = eng.scheduler.schedule()
    (entry,) = batch.seqs
    assert entry.start == 0 and entry.num_tokens == 40
    kv = {i: eng.kv.flat(i)[0].clone() for i in eng.kv.k}
    states = {i: t.clone() for i, t in eng.states.states.items()}
    graphs = _static(eng)
    with torch.inference_mode():
        graphs.run(batch.seqs)  # 40 tokens in a 64-token bucket, 1 of 1 piece slots: 24 padding tokens
    S, B, bs = eng.states.scratch_slot, eng.kv.scratch_block, eng.kv.block_size
    live_rows = set(eng.kv.token_rows(entry.seq.block_table, 0, 40).tolist())
    for i in states:
        for slot in range(S):
            if slot != entry.seq.slot:
                assert torch.equal(eng.states.states[i][slot], states[i][slot]), (i, slot)
        assert not torch.equal(eng.states.states[i][entry.seq.slot], states[i][entry.seq.slot])
    for i in kv:
        changed = (eng.kv.flat(i)[0] != kv[i]).flatten(1).any(1).nonzero().flatten().tolist()  # flat rows
        assert changed and all(r in live_rows or B * bs <= r < (B + 1) * bs for r in changed), (i, changed)


def test_buckets():
    assert prefill_buckets(1024) == [256, 512, 1024]
    assert prefill_buckets(3000) == [256, 512, 1024, 2048, 3000]
    assert prefill_buckets(128) == [128]
    assert prefill_buckets(131072) == [256, 512, 1024, 2048, 4096, MAX_GRAPH_TOKENS]  # longer steps run eagerly


def test_static_prefill_through_the_triton_kernels(make_llm, random_prompts, run_engine, monkeypatch):
    """The same comparison with every op on its Triton kernel (the interpreter on CPU): the segmented lightning
    plan (a 512-token bucket is cut into segments) and the padded offsets as a GPU runs them. The plans differ from
    the eager step's, so log-probs are compared with a tolerance, up to the first differing greedy token. Where CUDA
    is present the kernels run on it (fp32 weights, so the same tolerance holds): the interpreter takes CPU tensors
    only when TRITON_INTERPRET is set, which tests/conftest.py does only without CUDA."""
    pytest.importorskip("triton")
    monkeypatch.setenv("RINGLINEAR_BACKEND", "triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    seed = int(torch.randint(0, 10**6, (1,)))
    prompts = random_prompts(2, 300, 420, seed=seed) + random_prompts(2, 2, 60, seed=seed + 1)
    sp = SamplingParams(max_tokens=3, temperature=0.0, logprobs=True, ignore_eos=True)
    kw = dict(device=dev, dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=512,
              prefill_chunk=512)
    want = _run(make_llm(**kw).engine, prompts, [sp] * 4, run_engine)
    eng = make_llm(**kw).engine
    graphs = _static(eng, buckets=(128, 256, 512))
    used, split = [], []
    orig = graphs.step.forward

    def spy(T, S):
        out = orig(T, S)
        used.append((T, S))
        split.extend(p.split for c in graphs.step.contexts() for p in c.plans.values())
        return out
    graphs.step.forward = spy
    eng.runner.prefill_graphs = graphs
    got = _run(eng, prompts, [sp] * 4, run_engine)
    assert any(T == 512 for T, _ in used) and any(split), (used, split)
    for rid, w in want.items():
        g = got[rid]
        k = next((i for i, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b), len(w.token_ids))
        assert k >= 1, (g.token_ids, w.token_ids)
        torch.testing.assert_close(torch.tensor(g.logprobs[:k]), torch.tensor(w.logprobs[:k]), atol=1e-4, rtol=0)
