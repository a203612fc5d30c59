"""The engine against `ringlinear.generate`, and each sampling control."""
import pytest
import torch

from ringlinear.engine import RequestError, SamplingParams
from ringlinear.generation import generate


def test_greedy_matches_generate_token_for_token(make_llm, random_prompts):
    # Prompt lengths straddle the prefill piece (64) so multi-piece prefill and mixed steps are covered.
    llm = make_llm()
    prompts = random_prompts(10, 1, 200, seed=0)
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, logprobs=True))
    model = llm.engine.model
    for p, o in zip(prompts, outs):
        ref = generate(model, [p], max_new_tokens=24, temperature=0)
        assert o.token_ids == ref.sequences[0]
        assert o.finish_reason == ref.finish_reasons[0]
        # Not bitwise: generate() runs plain GEMMs, the engine fixed-row-block ones (see docs/serving.md).
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(ref.logprobs[0]), atol=1e-5, rtol=0)


def test_seeded_sampling_matches_generate(make_llm, random_prompts):
    llm = make_llm()
    prompts = random_prompts(3, 5, 90, seed=1)
    sp = [SamplingParams(max_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=s) for s in (11, 12, 13)]
    outs = llm.generate(prompts, sp)
    for p, o, s in zip(prompts, outs, sp):
        ref = generate(llm.engine.model, [p], max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=s.seed)
        assert o.token_ids == ref.sequences[0]


def test_max_tokens_stop_ids_and_stop_strings(make_llm, random_prompts):
    llm = make_llm()
    prompt = random_prompts(1, 30, 30, seed=2)[0]
    base = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert len(base.token_ids) == 30 and base.finish_reason == "length"

    stop_id = base.token_ids[6]
    k = base.token_ids.index(stop_id)
    o = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id]))[0]
    assert o.token_ids == base.token_ids[:k + 1] and o.finish_reason == "stop"

    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    o = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop, "never"]))[0]
    assert o.finish_reason == "stop"
    assert o.text == text[:text.index(stop)]


def test_stop_string_is_never_streamed(make_llm, random_prompts):
    llm = make_llm()
    eng = llm.engine
    prompt = random_prompts(1, 12, 12, seed=3)[0]
    base = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = base.text[10:14]
    eng.add_request(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=stop), "s")
    streamed = ""
    while eng.has_unfinished():
        for out in eng.step():
            streamed += out.delta_text
            assert stop not in streamed
            final = out
    assert final.finish_reason == "stop" and streamed == final.text == base.text[:base.text.index(stop)]


def test_logprobs_and_top_logprobs(make_llm, random_prompts):
    llm = make_llm()
    prompt = random_prompts(1, 20, 20, seed=4)[0]
    o = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, top_logprobs=5))[0]
    assert len(o.logprobs) == len(o.top_logprobs) == len(o.token_ids)
    for tok, lp, top in zip(o.token_ids, o.logprobs, o.top_logprobs):
        assert len(top) == 5 and top[0] == (tok, lp)  # greedy: the sampled token is the most likely one
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert lp <= 0


def test_prompt_validation(make_llm, random_prompts):
    llm = make_llm(num_kv_blocks=8, block_size=16)  # 128-token cache -> max_model_len 128
    eng = llm.engine
    assert eng.max_model_len == 128
    with pytest.raises(RequestError, match="context limit"):
        eng.add_request(list(range(3, 131)))
    with pytest.raises(RequestError, match="exceeds"):
        eng.add_request(list(range(3, 103)), SamplingParams(max_tokens=40))
    with pytest.raises(RequestError, match="empty"):
        eng.add_request([])
    with pytest.raises(RequestError, match="token ids"):
        eng.add_request([10**6])
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError, match="surrogate"):
        eng.add_request("a\ud800b")
    with pytest.raises(RequestError, match="stop_token_ids"):
        eng.add_request([5], SamplingParams(stop_token_ids=[10**6]))
    assert not eng.has_unfinished()


def test_text_over_the_context_is_refused_before_tokenising(make_llm, monkeypatch):
    eng = make_llm(num_kv_blocks=8, block_size=16).engine  # max_model_len 128
    k = eng.tokenizer.max_chars_per_token
    assert k is not None  # the tiny byte-level BPE proves a bound
    words = "def add(a, b): return a + b\n" * 200
    n_real = len(eng.tokenizer.encode(words))
    assert n_real >= 128 and len(words) > 127 * k  # over the limit, and provably so without counting
    monkeypatch.setattr(eng.tokenizer, "encode", lambda *a, **k: pytest.fail("tokenised a prompt it could refuse"))
    with pytest.raises(RequestError, match="at least") as e:
        eng.add_request(words)
    assert e.value.code == "context_length_exceeded"
    monkeypatch.undo()
    # Soundness, the property the check rests on: no text has more than k characters per token. Tried on texts
    # built to pack characters: runs of the longest vocabulary strings, special tokens, multi-byte characters.
    import random
    rng = random.Random(0)
    tok = eng.tokenizer
    longest = sorted(tok.tokenizer.get_vocab(with_added_tokens=True), key=len, reverse=True)[:40]
    pieces = ["<|endoftext|>", "<|role_end|>", "   ", "\n\n", "é", "中文", "🙂", "def ", "return"]
    for _ in range(300):
        text = "".join(rng.choice(longest + pieces) for _ in range(rng.randint(1, 60)))
        text = text.replace("Ġ", " ").replace("Ċ", "\n")  # byte-level symbols back to the characters they spell
        assert len(text) <= k * len(tok.encode(text)), text


def test_abort_frees_memory_at_once(make_llm, random_prompts):
    llm = make_llm()
    eng = llm.engine
    for i, p in enumerate(random_prompts(4, 40, 100, seed=5)):
        eng.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True), f"r{i}")
    for _ in range(4):
        eng.step()
    assert eng.stats()["free_kv_blocks"] < eng.kv.num_blocks
    for i in range(4):
        eng.abort_request(f"r{i}")
    s = eng.stats()
    assert s["running"] == s["waiting"] == 0 and not eng.has_unfinished()
    assert s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"]


def test_chat_uses_the_template(make_llm, random_prompts):
    llm = make_llm()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]
    o = llm.chat(msgs, SamplingParams(max_tokens=5, temperature=0))[0]
    ids = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert o.prompt_token_ids == ids
    assert o.token_ids == llm.generate([ids], SamplingParams(max_tokens=5, temperature=0))[0].token_ids


def test_token_slice_spans_prompt_and_output():
    from ringlinear.engine.sequence import Sequence
    seq = Sequence("r", [1, 2, 3], SamplingParams(max_tokens=5), None, max_model_len=100)
    seq.output_token_ids += [4, 5]
    full = [1, 2, 3, 4, 5]
    for a in range(6):
        for b in range(a, 6):
            assert seq.token_slice(a, b) == full[a:b]


def test_a_dropped_engine_frees_its_model(make_llm):
    """A dropped engine gives its model back to the garbage collector even when the caller's code made a reference
    cycle through it, as benchmarks/long_context.py does by wrapping `runner.execute`: a process that builds several
    engines must get their memory back. (gc.freeze at engine build once broke this: frozen cycles are never
    collected, and the next model did not fit the GPU.)"""
    import gc
    import weakref
    def wrap(runner):  # runner -> lambda -> its closure cell -> bound method -> runner
        real = runner.execute
        runner.execute = lambda batch: real(batch)
    llm = make_llm()
    wrap(llm.engine.runner)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))
    ref = weakref.ref(llm.engine.model)
    del llm
    gc.collect()
    assert ref() is None
