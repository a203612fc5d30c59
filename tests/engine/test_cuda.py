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
