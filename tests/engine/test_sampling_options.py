"""Penalties, logit_bias and min_p through the engine: the same tokens as `generate()` (one implementation,
`ringlinear.sampling`), bitwise the same alone and batched, reported log-probs unprocessed, bad values refused."""
import pytest
import torch

from ringlinear.engine import RequestError, SamplingParams
from ringlinear.generation import generate
from ringlinear.sampling import Sampling

OPTIONS = [
    dict(repetition_penalty=1.8),
    dict(presence_penalty=1.5, frequency_penalty=0.8),
    dict(logit_bias={"5": 4.0, "9": -100.0}, min_p=0.1),
    dict(repetition_penalty=0.8, frequency_penalty=-0.5, logit_bias={"11": 2.0}),
]


@pytest.mark.parametrize("kw", OPTIONS)
def test_engine_equals_generate(make_llm, random_prompts, kw):
    llm = make_llm()
    prompts = random_prompts(3, 5, 100, seed=20)
    for temp, seed in ((0.0, None), (1.0, 5)):
        sp = SamplingParams(max_tokens=20, temperature=temp, seed=seed, ignore_eos=True, **kw)
        outs = llm.generate(prompts, sp)
        for i, (p, o) in enumerate(zip(prompts, outs)):
            ref = generate(llm.engine.model, [p], stop_token_ids=[], sampling=Sampling(
                max_tokens=20, temperature=temp, seed=seed, **kw))
            assert o.token_ids == ref.sequences[0], (kw, temp, i)


def test_penalties_change_greedy_output_and_ban_tokens(make_llm, random_prompts):
    llm = make_llm()
    prompt = random_prompts(1, 40, 40, seed=21)[0]
    base = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert len(set(base.token_ids)) < 30  # the random model repeats itself greedily
    rep = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                frequency_penalty=2.0, presence_penalty=2.0))[0]
    assert len(set(rep.token_ids)) > len(set(base.token_ids))
    banned = set(base.token_ids)
    o = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True,
                                              logit_bias={str(t): -100 for t in banned}))[0]
    assert not banned & set(o.token_ids)
    forced = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True,
                                                   logit_bias={"77": 100}))[0]
    assert forced.token_ids == [77] * 5


def test_reported_logprobs_are_the_models_not_the_processed(make_llm, random_prompts):
    llm = make_llm()
    prompt = random_prompts(1, 30, 30, seed=22)[0]
    forced = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, top_logprobs=2,
                                                   logit_bias={"77": 100}))[0]
    # teacher-forced without the bias: the same log-probs (through the prefill kernels instead of the decode ones:
    # equal within fp32 rounding, docs/serving.md)
    eng = llm.engine
    plain = llm.generate([prompt + forced.token_ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    torch.testing.assert_close(torch.tensor(forced.logprobs), torch.tensor(plain.prompt_logprobs[len(prompt):]),
                               atol=1e-4, rtol=0)
    assert all(lp < -1 for lp in forced.logprobs)  # 77 is not what the model favours: a biased lp would be ~0
    assert eng.stats()["running"] == 0


@pytest.mark.parametrize("kw", OPTIONS[:3])
def test_processed_sampling_is_batch_invariant(make_llm, random_prompts, kw):
    llm = make_llm()
    target = random_prompts(1, 90, 90, seed=23)[0]
    sp = SamplingParams(max_tokens=16, temperature=0.9, seed=4, logprobs=True, ignore_eos=True, **kw)
    alone = llm.generate([target], sp)[0]
    others = random_prompts(5, 1, 150, seed=24)
    mixed = llm.generate(others[:2] + [target] + others[2:],
                         [SamplingParams(max_tokens=12, temperature=0.5, seed=1, repetition_penalty=1.2)] * 2 +
                         [sp] + [SamplingParams(max_tokens=9, temperature=0)] * 3)[2]
    assert (mixed.token_ids, mixed.logprobs) == (alone.token_ids, alone.logprobs)


def test_logit_bias_ids_checked_against_the_vocabulary(make_llm):
    llm = make_llm()
    with pytest.raises(RequestError) as e:
        llm.engine.prepare([5, 6], SamplingParams(logit_bias={"384": 1.0}))  # the tiny vocab is 384
    assert e.value.param == "logit_bias"
    with pytest.raises(ValueError, match="logit_bias"):
        generate(llm.engine.model, [[5, 6]], sampling=Sampling(logit_bias={"400": 1.0}))


def test_aligned_logprobs_stay_the_models_under_penalties(tiny_dir, random_prompts):
    from ringlinear.engine import LLM
    from ringlinear.rl import sequence_logprobs
    llm = LLM(tiny_dir, device="cpu", numerics="aligned", max_num_seqs=4, num_kv_blocks=256, prefill_chunk=64,
              max_num_batched_tokens=256)
    prompts = random_prompts(3, 5, 120, seed=25)
    sp = [SamplingParams(max_tokens=16, temperature=1.0, seed=i, logprobs=True, ignore_eos=True, **kw)
          for i, kw in enumerate(OPTIONS[:3])]
    outs = llm.generate(prompts, sp)
    with torch.no_grad():
        train = sequence_logprobs(llm.engine.model, prompts, [o.token_ids for o in outs], numerics="aligned")
    for o, t in zip(outs, train):
        assert torch.equal(torch.tensor(o.logprobs, dtype=torch.float32), t)  # raw log-probs, bitwise
