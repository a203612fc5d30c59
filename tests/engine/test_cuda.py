"""The engine on a GPU: CUDA-graph decode equals eager decode, and greedy outputs equal `generate()`.

Skipped without CUDA. Written without access to a GPU: these have not run yet."""
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
