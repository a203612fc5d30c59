"""The engine on a GPU: CUDA-graph decode equals eager decode, and greedy outputs equal `generate()`.

Skipped without CUDA; all passed on an H200 (torch 2.11, 2026-12-01) except the async-scheduling test, added on
2026-12-02 and not yet run on a GPU."""
import pytest
import torch

from ringlinear.engine import SamplingParams
from ringlinear.generation import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_graph_decode_matches_eager_and_generate(make_llm, random_prompts):
    prompts = random_prompts(6, 1, 150, seed=60)
    sp = SamplingParams(max_tokens=20, temperature=0, logprobs=True, ignore_eos=True)
    graphed = make_llm(device="cuda", cuda_graphs=True, cuda_graph_max_batch=8)
    assert graphed.engine.runner.graphs is not None, "CUDA graph capture failed (see the warning in the log)"
    eager = make_llm(device="cuda", cuda_graphs=False)
    a = graphed.generate(prompts, sp)
    b = eager.generate(prompts, sp)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)
    for p, x in zip(prompts, b):
        ref = generate(eager.engine.model, [p], max_new_tokens=20, temperature=0, stop_token_ids=[])
        assert x.token_ids == ref.sequences[0]
    s = graphed.engine.stats()
    assert s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"]


@pytest.mark.parametrize("numerics", ["default", "aligned"])
def test_prefix_hits_and_forks_equal_cold_runs_on_cuda(make_llm, random_prompts, numerics):
    """Each request alone, so the cached part was computed with the same shapes as the cold run's: aligned numerics
    claims bitwise; default numerics is compared with a tolerance (the claim there is batch variance at most)."""
    system = random_prompts(1, 200, 200, seed=61)[0]
    prompts = [system + u for u in random_prompts(3, 5, 60, seed=62)]
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=i, logprobs=True, ignore_eos=True) for i in range(3)]
    cold = make_llm(device="cuda", numerics=numerics, enable_prefix_caching=False)
    want = [cold.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    want_group = [cold.generate([prompts[0]], sp)[0] for sp in params]
    llm = make_llm(device="cuda", numerics=numerics, cuda_graph_max_batch=8)
    got = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    eng = llm.engine
    assert eng.stats()["prefix_cache_hits"] == 2
    rids = eng.add_group(prompts[0], params)  # hits the cache and forks (decode steps replay CUDA graphs)
    done = {}
    while eng.has_unfinished():
        done.update((o.request_id, o) for o in eng.step() if o.finished)
    got_group = [done[r] for r in rids]
    assert eng.stats()["forked_requests"] == 2
    for a, b in zip(got + got_group, want + want_group):
        assert a.token_ids == b.token_ids
        diff = max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs))
        print(numerics, "max |dlogprob| hit/fork vs cold:", diff)
        assert diff == 0.0 if numerics == "aligned" else diff < 1e-4
    s = eng.stats()
    assert s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"]


def test_sampling_options_and_prompt_logprobs_on_the_gpu(make_llm, random_prompts):
    """Bias and penalties processed on the device (the batched-argmax path included), prompt log-probs scored
    from the GPU prefill. Tolerances: fp32 on a GPU (TF32 may be on for the plain forward)."""
    from ringlinear.sampling import Sampling
    llm = make_llm(device="cuda", cuda_graphs=True, cuda_graph_max_batch=8)
    prompts = random_prompts(4, 5, 140, seed=61)
    kw = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"9": -100})
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, **kw))
    for p, o in zip(prompts, outs):
        ref = generate(llm.engine.model, [p], stop_token_ids=[], sampling=Sampling(max_tokens=16, temperature=0,
                                                                                   **kw))
        assert o.token_ids == ref.sequences[0] and 9 not in o.token_ids
    forced = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                  logit_bias={"77": 100}))
    assert all(o.token_ids == [77] * 4 for o in forced)
    scored = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=2))
    for p, o in zip(prompts, scored):
        with torch.no_grad():
            lp = torch.log_softmax(llm.engine.model(torch.tensor([p], device="cuda")).logits[0].float(), -1)
        want = lp[torch.arange(len(p) - 1), torch.tensor(p[1:], device="cuda")].cpu()
        torch.testing.assert_close(torch.tensor(o.prompt_logprobs[1:]), want, atol=2e-3, rtol=0)


def test_prefill_graphs_match_eager(make_llm, random_prompts):
    """Steps of fresh prompt pieces replayed from CUDA graphs (prefill_cuda_graphs), bf16 weights: capture
    succeeds; over waves of prompts the graphs are replayed at several buckets, with padding, the same graph more
    than once; greedy outputs match the engine without prefill graphs (decode graphs on in both) up to the first
    differing token, log-probs within 2e-2 (the padded shapes take other kernel splits); and one step through the
    graph gives the eager step's logits, live state slots and live KV rows within bf16 tolerances."""
    kw = dict(device="cuda", dtype="bfloat16", enable_prefix_caching=False, max_num_batched_tokens=1024,
              prefill_chunk=256)
    graphed = make_llm(**kw)  # on by default
    pg = graphed.engine.runner.prefill_graphs
    assert pg is not None, "prefill CUDA graph capture failed (see the warning in the log)"
    assert pg.buckets == [256, 512, 1024]
    shapes = []
    orig = pg.run
    pg.run = lambda entries: shapes.append((pg.step.shape_for(entries, pg.buckets),
                                            sum(e.num_tokens for e in entries))) or orig(entries)
    plain = make_llm(prefill_cuda_graphs=False, **kw)
    assert plain.engine.runner.prefill_graphs is None
    sp = SamplingParams(max_tokens=6, temperature=0, logprobs=True, ignore_eos=True)
    # 300 tokens: a 256 piece, then eager; 3 x 100 twice: (512, 4) with padding, replayed again; 6 short; 2 x 256
    for wave, (n, lo, hi) in enumerate([(1, 300, 300), (3, 100, 100), (3, 100, 100), (6, 2, 150), (2, 400, 500)]):
        prompts = random_prompts(n, lo, hi, seed=70 + wave)
        for x, y in zip(graphed.generate(prompts, sp), plain.generate(prompts, sp)):
            k = next((i for i, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q), len(x.token_ids))
            assert k >= 1, (x.token_ids, y.token_ids)
            torch.testing.assert_close(torch.tensor(x.logprobs[:k]), torch.tensor(y.logprobs[:k]), atol=2e-2,
                                       rtol=0)
    used = {shape for shape, _ in shapes}
    assert len({T for T, _ in used}) >= 2, shapes                       # several token buckets
    assert any(total < shape[0] for shape, total in shapes), shapes     # padding tokens
    assert len(shapes) > len(used), shapes                              # a graph replayed more than once

    eng = graphed.engine  # one step, graph vs eager, on the same inputs
    for i, p in enumerate(random_prompts(3, 40, 300, seed=79)):
        eng.add_request(p, SamplingParams(max_tokens=2, ignore_eos=True), f"x{i}")
    batch = eng.scheduler.schedule()
    assert all(s.start == 0 and s.num_tokens >= 2 for s in batch.seqs) and pg.fits(batch.seqs)
    rows = torch.cat([eng.kv.token_rows(s.seq.block_table, 0, s.num_tokens) for s in batch.seqs]).cuda()
    slots = [s.seq.slot for s in batch.seqs]
    kv0 = {i: eng.kv.flat(i)[0].clone() for i in eng.kv.k}
    st0 = {i: t.clone() for i, t in eng.states.states.items()}
    graph_logits = eng.runner.execute(batch).clone()
    graph_kv = {i: eng.kv.flat(i)[0][rows].clone() for i in eng.kv.k}
    graph_st = {i: t[slots].clone() for i, t in eng.states.states.items()}
    for i in kv0:
        eng.kv.flat(i)[0].copy_(kv0[i])
    for i, t in st0.items():
        eng.states.states[i].copy_(t)
    eng.runner.prefill_graphs = None
    eager_logits = eng.runner.execute(batch)
    eng.runner.prefill_graphs = pg
    torch.testing.assert_close(graph_logits, eager_logits, atol=5e-2, rtol=2e-2)
    for i in graph_kv:
        torch.testing.assert_close(graph_kv[i], eng.kv.flat(i)[0][rows], atol=2e-2, rtol=2e-2)
    for i in graph_st:
        torch.testing.assert_close(graph_st[i], eng.states.states[i][slots], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("numerics", ["default", "aligned"])
def test_async_scheduling_equals_sync_on_cuda(make_llm, random_prompts, numerics):
    """The lookahead's device tokens feed the decode graph (engine/overlap.py). Every request runs to the same
    length, so both engines run the same batches at every step: tokens bitwise equal in both numerics."""
    prompts = random_prompts(6, 1, 150, seed=63)
    params = [SamplingParams(max_tokens=24, temperature=0 if i % 2 else 0.9, seed=i, ignore_eos=True,
                             logprobs=i % 3 == 0) for i in range(6)]
    sync = make_llm(device="cuda", numerics=numerics, cuda_graph_max_batch=8, async_scheduling=False)
    fast = make_llm(device="cuda", numerics=numerics, cuda_graph_max_batch=8)  # on by default for CUDA
    assert fast.engine.async_scheduling
    assert fast.engine.runner.graphs is not None, "CUDA graph capture failed (see the warning in the log)"
    a, b = sync.generate(prompts, params), fast.generate(prompts, params)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b] and a[0].logprobs  # copied out with the tokens
    s = fast.engine.stats()
    assert s["async_scheduled_steps"] >= 20
    assert s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"]
