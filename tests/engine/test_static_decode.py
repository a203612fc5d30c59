"""The CUDA-graph decode step (static buffers, padded batch, masked paged attention) run eagerly on CPU must give
the same logits as the eager paged context: this checks its logic without a GPU."""
import pytest
import torch

from ringlinear.engine import SamplingParams
from ringlinear.engine.cuda_graph import StaticDecodeStep, graph_batch_sizes


@pytest.mark.parametrize("forked", [False, True])
def test_static_decode_step_matches_paged_context(make_llm, random_prompts, forked):
    """forked: three samples of one prompt, whose block tables share the prompt's full blocks."""
    llm = make_llm(block_size=8)
    eng = llm.engine
    if forked:
        eng.add_group(random_prompts(1, 37, 37, seed=41)[0],
                      [SamplingParams(max_tokens=50, temperature=1.0, seed=i, ignore_eos=True) for i in range(3)],
                      [f"r{i}" for i in range(3)])
    for i, p in enumerate(random_prompts(3, 5, 40, seed=40) if not forked else []):
        eng.add_request(p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), f"r{i}")
    while not all(s.num_uncomputed == 1 for s in eng.scheduler.running) or len(eng.scheduler.running) < 3:
        eng.step()
    batch = eng.scheduler.schedule()
    assert batch.all_decode and len(batch.seqs) == 3
    tables = [s.seq.block_table for s in batch.seqs]
    assert (tables[0][:4] == tables[1][:4] == tables[2][:4]) == forked  # 37 tokens: 4 full blocks shared
    snapshot = {i: (eng.kv.k[i].clone(), eng.kv.v[i].clone()) for i in eng.kv.k}
    states = {i: t.clone() for i, t in eng.states.states.items()}
    eager = eng.runner.execute(batch)
    after = {i: t.clone() for i, t in eng.states.states.items()}
    kv_after = {i: eng.kv.k[i].clone() for i in eng.kv.k}

    for i, (k, v) in snapshot.items():  # undo the eager step's cache writes
        eng.kv.k[i].copy_(k)
        eng.kv.v[i].copy_(v)
    for i, t in states.items():
        eng.states.states[i].copy_(t)
    step = StaticDecodeStep(eng.model, eng.kv, eng.states, max_batch=5, max_blocks=eng.kv.blocks_needed(200),
                            device=torch.device("cpu"))
    n = step.load(batch.seqs)
    with torch.inference_mode():
        static = step.forward(4)[:n]  # padded to a graph size of 4: one scratch row
    torch.testing.assert_close(static, eager, atol=1e-5, rtol=1e-5)
    # Same state and KV updates; the padded row wrote only to the scratch slot and scratch block.
    S, B = eng.states.scratch_slot, eng.kv.scratch_block
    for i in states:
        torch.testing.assert_close(eng.states.states[i][:S], after[i][:S], atol=1e-5, rtol=1e-5)
    for i in kv_after:
        torch.testing.assert_close(eng.kv.k[i][:B], kv_after[i][:B], atol=1e-5, rtol=1e-5)


def test_graph_batch_sizes():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(1) == [1]


def test_incremental_block_tables_match_a_full_rebuild():
    """The graph step rewrites only changed rows of its block table; after any sequence of loads (growth,
    reordering, a preempted request coming back with new blocks, a shrinking batch) it must equal a full rebuild."""
    from types import SimpleNamespace as NS

    class KV:
        block_size, scratch_block = 4, 99

    class States:
        scratch_slot = 7

    step = StaticDecodeStep.__new__(StaticDecodeStep)
    StaticDecodeStep.__init__(step, None, KV(), States(), max_batch=4, max_blocks=6, device=torch.device("cpu"))
    seqs = {r: NS(request_id=r, num_preemptions=0, block_table=[], slot=i, token_slice=lambda a, b: [1])
            for i, r in enumerate("abc")}
    seqs["a"].block_table, seqs["b"].block_table, seqs["c"].block_table = [3], [5, 6], [8]
    g = torch.Generator().manual_seed(0)
    for it in range(30):
        order = [seqs[r] for r in "abc"]
        order = [order[j] for j in torch.randperm(3, generator=g).tolist()][: 1 + it % 3]
        for s in order:
            if torch.rand(1, generator=g) < 0.3 and len(s.block_table) < 6:
                s.block_table.append(int(torch.randint(0, 50, (1,), generator=g)))
        if it == 12:  # preempted and re-admitted with the same number of (different) blocks
            seqs["b"].num_preemptions += 1
            seqs["b"].block_table = [40 + j for j in range(len(seqs["b"].block_table))]
        entries = [NS(seq=s, start=len(s.block_table) * 4 - 1) for s in order]
        step.load(entries)
        want = torch.full((4, 6), 99, dtype=torch.long)
        for i, s in enumerate(order):
            want[i, :len(s.block_table)] = torch.tensor(s.block_table)
        assert torch.equal(step.block_tables, want), it
