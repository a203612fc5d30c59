"""The official `openai` client against a live server: the new sampling options, echo with prompt log-probs (what
lm-evaluation-harness sends for log-likelihood), and response_format (json_object / json_schema via xgrammar)."""
import json
import sys

import httpx
import openai
import pytest
import torch

from ringlinear.engine import SamplingParams

AUTH = {"Authorization": "Bearer test-key"}


def _engine(server, prompt_ids, **kw):
    """A request straight through the engine the server wraps (on its thread)."""
    def run(e):
        rid = e.add_request(prompt_ids, SamplingParams(**kw))
        while True:
            for out in e.step():
                if out.request_id == rid and out.finished:
                    return out
    return server.engine.call(run, timeout=60)


def _still_serving(client):
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens == 2


# ---------------------------------------------------------------------- sampling options
def test_sampling_options_reach_the_engine(client, server):
    tok = server.engine.engine.tokenizer
    prompt = "The hybrid model interleaves"
    opts = dict(presence_penalty=0.7, frequency_penalty=1.1, logit_bias={"12": 3.0, "40": -100})
    extra = dict(repetition_penalty=1.3, min_p=0.05, ignore_eos=True)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0.8, seed=5,
                                  extra_body=extra, **opts)
    ref = _engine(server, tok.encode(prompt), max_tokens=12, temperature=0.8, seed=5, **opts, **extra)
    assert r.choices[0].text == ref.text
    forced = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0, logit_bias={"77": 100})
    assert forced.choices[0].message.content == tok.decode([77] * 4)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", presence_penalty=3.0)
    assert e.value.param == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", extra_body={"min_p": -1})
    assert e.value.param == "min_p"
    _still_serving(client)


# ---------------------------------------------------------------------- echo
def _full_forward_logprobs(server, ids):
    with torch.no_grad():
        logits = server.engine.engine.model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def test_echo_scores_the_prompt_like_lm_eval(client, server):
    tok = server.engine.engine.tokenizer
    prompts = ["Numbers 0 1 2 3 4 5", "def add(a, b):\n    return a + b"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert r.usage.completion_tokens == 0
    for c, p in zip(r.choices, prompts):
        ids = tok.encode(p)
        lp = c.logprobs
        assert c.text == p and c.finish_reason == "length"
        assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = _full_forward_logprobs(server, ids)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        # the engine's batch-invariant GEMMs vs the plain forward: fp32 rounding, not bitwise
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-5, rtol=0)
        assert all(len(t) == 2 for t in lp.top_logprobs[1:])
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_with_generation_and_streaming(client, server):
    kw = dict(model="tiny", prompt="class Cache:", max_tokens=6, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0]
    echoed = client.completions.create(echo=True, **kw).choices[0]
    P = len(server.engine.engine.tokenizer.encode("class Cache:"))
    assert echoed.text == "class Cache:" + plain.text
    assert len(echoed.logprobs.tokens) == P + 6
    assert echoed.logprobs.token_logprobs[P:] == plain.logprobs.token_logprobs  # the generated part is unchanged
    chunks = [c.choices[0] for c in client.completions.create(echo=True, stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == echoed.text
    assert [v for c in chunks for v in c.logprobs.token_logprobs] == echoed.logprobs.token_logprobs
    assert chunks[0].text == "class Cache:" and chunks[0].logprobs.text_offset == echoed.logprobs.text_offset[:P]
    # echo without logprobs; a token-id prompt is echoed as its text
    ids = [5, 6, 7, 8]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True)
    assert r.choices[0].text == server.engine.engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert r.choices[0].logprobs is None


# ---------------------------------------------------------------------- response_format
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "ok", "n"],
          "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999}}}


def _validate(obj):
    try:
        import jsonschema
    except ImportError:  # the required keys and their types, by hand
        assert set(obj) == set(SCHEMA["required"]) and isinstance(obj["ok"], bool) and isinstance(obj["n"], int)
        return
    jsonschema.validate(obj, SCHEMA)


@pytest.fixture
def xgrammar():
    return pytest.importorskip("xgrammar", reason="response_format needs xgrammar (pip install xgrammar)")


def test_json_schema_parses_and_validates(client, xgrammar):
    rf = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    msgs = [{"role": "user", "content": "Weather as JSON"}]
    for seed in (1, 2):
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=80, temperature=1.0, seed=seed,
                                           response_format=rf)
        assert r.choices[0].finish_reason == "stop"
        _validate(json.loads(r.choices[0].message.content))
        chunks = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=80, temperature=1.0,
                                                seed=seed, response_format=rf, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r.choices[0].message.content
    comp = client.completions.create(model="tiny", prompt="JSON:", max_tokens=80, temperature=0,
                                     extra_body={"response_format": rf})
    _validate(json.loads(comp.choices[0].text))


def test_json_object(client, xgrammar):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "{}"}], max_tokens=60,
                                       temperature=1.0, seed=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_a_rejected_grammar_is_a_400(client, server, xgrammar):
    msgs = [{"role": "user", "content": "x"}]
    for schema in ({"type": "nonsense-type"}, {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=msgs, response_format={
                "type": "json_schema", "json_schema": {"name": "bad", "schema": schema}})
        assert e.value.param == "response_format" and "rejected" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, response_format={"type": "regex"})
    assert e.value.param == "response_format"
    _still_serving(client)


def test_without_xgrammar_response_format_is_a_one_line_400(server, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError in this process
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["message"] == "response_format needs xgrammar: pip install 'ringlinear[serve]'"
    assert err["param"] == "response_format"
