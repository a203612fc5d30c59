"""The CUDA-graph decode step (static buffers, padded batch, masked paged attention) run eagerly on CPU must give
the same logits as the eager paged context: this checks its logic without a GPU."""
import torch

from ringlinear.engine import SamplingParams
from ringlinear.engine.cuda_graph import StaticDecodeStep, graph_batch_sizes


def test_static_decode_step_matches_paged_context(make_llm, random_prompts):
    llm = make_llm(block_size=8)
    eng = llm.engine
    for i, p in enumerate(random_prompts(3, 5, 40, seed=40)):
        eng.add_request(p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), f"r{i}")
    while not all(s.num_uncomputed == 1 for s in eng.scheduler.running) or len(eng.scheduler.running) < 3:
        eng.step()
    batch = eng.scheduler.schedule()
    assert batch.all_decode and len(batch.seqs) == 3
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
