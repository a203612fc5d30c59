"""The official `openai` client against a live server: completions, chat, streaming, stop, max_tokens, logprobs."""
import httpx
import pytest

from ringlinear.engine import SamplingParams


def _engine_greedy(server, prompt_ids, n):
    """Greedy tokens straight from the engine the server wraps (engine thread, so no race)."""
    eng = server.engine

    def run(e):
        rid = e.add_request(prompt_ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        while True:
            for out in e.step():
                if out.request_id == rid and out.finished:
                    return out
    return eng.call(run, timeout=60)


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_greedy_equals_engine(client, server):
    tok = server.engine.engine.tokenizer
    prompt = "The hybrid model interleaves linear attention"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    ref = _engine_greedy(server, tok.encode(prompt), 12)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_token_prompts_and_n(client):
    r = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=3, temperature=0.8,
                                  n=2, seed=3, extra_body={"ignore_eos": True})
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
    again = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=3, temperature=0.8,
                                      n=2, seed=3, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible


def test_max_tokens_and_stop(client):
    base = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    assert base.usage.completion_tokens == 20
    stop = text[8:11]
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]
    short = client.completions.create(model="tiny", prompt="Hello", max_tokens=1, temperature=0)
    assert short.usage.completion_tokens == 1


def test_completion_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Numbers 0 1 2", max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert v <= 0 and len(top) <= 3 and max(top.values()) == pytest.approx(v)


def test_chat(client, server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    tok = server.engine.engine.tokenizer
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = _engine_greedy(server, ids, 8)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(c.logprobs.content) == 8
    assert c.message.content == ref.text and c.finish_reason == "length"
    for e in c.logprobs.content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)


def test_streaming_completion_equals_non_streaming(client):
    kw = dict(model="tiny", prompt="class Cache:", max_tokens=15, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15 and not chunks[-1].choices


def test_streaming_chat(client):
    msgs = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_raw_sse_format(server):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": "Bearer test-key"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_health_is_open_and_api_key_required(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    from openai import AuthenticationError, OpenAI
    for key in ("wrong", ""):
        bad = OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            continue
        with pytest.raises(AuthenticationError) as e:
            bad.completions.create(model="tiny", prompt="x", max_tokens=1)
        assert e.value.status_code == 401


def test_streaming_logprobs_match_non_streaming(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=9, temperature=0,
              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in full]
    assert len(streamed) == 9
    comp = client.completions.create(model="tiny", prompt="count", max_tokens=5, temperature=0, logprobs=1,
                                     stream=True, extra_body={"ignore_eos": True})
    assert sum(len(c.choices[0].logprobs.tokens) for c in comp if c.choices) == 5
