"""What RL needs from the engine: log-probs of the tempered distribution, and sleep()/wake() around training."""
import pytest
import torch

from ringlinear.engine import EngineConfig, LLMEngine, SamplingParams
from ringlinear.models.modeling import RingLinearForCausalLM


def _engine(tiny_dir):
    model = RingLinearForCausalLM.from_pretrained(tiny_dir)
    return LLMEngine(config=EngineConfig(device="cpu", max_num_seqs=4, num_kv_blocks=64, prefill_chunk=64,
                                         max_num_batched_tokens=128), model=model)


def _run(eng, prompts, params):
    rids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while len(done) < len(rids):
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    return [done[r] for r in rids]


def test_tempered_logprobs(tiny_dir, random_prompts):
    eng = _engine(tiny_dir)
    prompt = random_prompts(1, 30, 30, seed=3)[0]
    base = dict(max_tokens=12, seed=5, logprobs=True, ignore_eos=True)
    raw, tempered = _run(eng, [prompt, prompt], [SamplingParams(temperature=0.7, **base),
                                                 SamplingParams(temperature=0.7, tempered_logprobs=True, **base)])
    assert raw.token_ids == tempered.token_ids  # the flag changes what is reported, not what is sampled
    # independent: the tempered log-prob from the raw log-probs of the full distribution at each step
    model = eng.model
    with torch.no_grad():
        ids = torch.tensor([prompt + raw.token_ids])
        logits = model(ids).logits[0, len(prompt) - 1:-1].double()
    toks = torch.tensor(raw.token_ids)[:, None]
    want_raw = torch.log_softmax(logits, -1).gather(1, toks)[:, 0]
    want_t = torch.log_softmax(logits / 0.7, -1).gather(1, toks)[:, 0]
    torch.testing.assert_close(torch.tensor(raw.logprobs, dtype=torch.float64), want_raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(tempered.logprobs, dtype=torch.float64), want_t, atol=1e-5, rtol=1e-5)
    assert (want_raw - want_t).abs().max() > 1e-3
    one, = _run(eng, [prompt], [SamplingParams(temperature=1.0, tempered_logprobs=True, **base)])
    ref, = _run(eng, [prompt], [SamplingParams(temperature=1.0, **base)])
    assert one.logprobs == ref.logprobs  # temperature 1: bitwise the raw log-probs


def test_sleep_frees_and_wake_restores(tiny_dir, random_prompts):
    eng = _engine(tiny_dir)
    prompts = random_prompts(3, 5, 90, seed=4)
    sp = [SamplingParams(max_tokens=10, temperature=1.0, seed=i, logprobs=True, ignore_eos=True) for i in range(3)]
    before = _run(eng, prompts, sp)
    eng.add_request(prompts[0], sp[0])
    with pytest.raises(RuntimeError, match="unfinished"):
        eng.sleep()
    eng.abort_request(next(iter(eng.seqs)))
    eng.sleep()
    assert eng.asleep and eng.kv.memory_bytes() == 0 and eng.states.memory_bytes() == 0
    with pytest.raises(RuntimeError, match="asleep"):
        eng.add_request(prompts[0], sp[0])
    eng.wake()
    assert eng.kv.memory_bytes() > 0 and eng.states.memory_bytes() > 0
    after = _run(eng, prompts, sp)
    assert [(o.token_ids, o.logprobs) for o in after] == [(o.token_ids, o.logprobs) for o in before]
    s = eng.stats()
    assert s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"]
