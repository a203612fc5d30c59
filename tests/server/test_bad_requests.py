"""Every kind of invalid request gets a 4xx with an OpenAI-style error body, and the server keeps serving."""
import httpx
import openai
import pytest

AUTH = {"Authorization": "Bearer test-key"}


def _post(server, path, **kw):
    return httpx.post(server.url + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=30, **kw)


def _is_openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


BAD_JSON = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "x",'),   # truncated
    ("/v1/completions", b"not json at all"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [}'),
]

WRONG_TYPES = [
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 7}]}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": 3},
     "logprobs"),
]

BAD_VALUES = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"temperature": -1.0}, None),
    ({"top_p": 0.0}, None),
    ({"logprobs": 99}, "logprobs"),
    ({"n": 0}, "n"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10**7]}, "prompt"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 150}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),         # past the tiny vocabulary
    ({"logit_bias": {"5": "high"}}, "logit_bias.5"),
    ({"max_tokens": 0, "echo": False}, "max_tokens"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "tail"}, "suffix"),
    # options this server does not implement are refused by name, never ignored
    ({"min_tokens": 3}, "min_tokens"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"stream_options": {"include_usage": True, "continuous_usage_stats": True}, "stream": True},
     "stream_options.continuous_usage_stats"),
]


def _still_serving(server):
    r = _post(server, "/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("path,body", BAD_JSON)
def test_malformed_json(server, path, body):
    err = _is_openai_error(_post(server, path, content=body, headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in err["message"]


@pytest.mark.parametrize("path,body,param", WRONG_TYPES)
def test_wrong_types(server, path, body, param):
    err = _is_openai_error(_post(server, path, json=body), 400)
    assert err["param"].startswith(param)


@pytest.mark.parametrize("extra,param", BAD_VALUES)
def test_bad_values(server, extra, param):
    err = _is_openai_error(_post(server, "/v1/completions", json={"model": "tiny", "prompt": "x", **extra}), 400)
    if param:
        assert err["param"] == param


def test_unknown_model_and_route(server):
    err = _is_openai_error(_post(server, "/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"
    _is_openai_error(_post(server, "/v1/chat/completions",
                           json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404)
    _is_openai_error(_post(server, "/v1/nothing", json={}), 404)
    _still_serving(server)


def test_prompt_over_context_limit(server):
    too_long = [5] * 600  # the test server's max_model_len is 512
    err = _is_openai_error(_post(server, "/v1/completions", json={"model": "tiny", "prompt": too_long}), 400)
    assert err["code"] == "context_length_exceeded"
    err = _is_openai_error(_post(server, "/v1/completions",
                                 json={"model": "tiny", "prompt": [5] * 500, "max_tokens": 100}), 400)
    assert err["code"] == "context_length_exceeded"
    long_chat = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}]}
    assert _is_openai_error(_post(server, "/v1/chat/completions", json=long_chat), 400)["code"] == \
        "context_length_exceeded"
    _still_serving(server)


def test_openai_client_sees_typed_errors(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[1] * 1000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", stream=True, max_tokens=0)
    with pytest.raises(openai.BadRequestError) as e:  # the client does not check types: the server must
        client.completions.create(model="tiny", prompt="x", max_tokens="ten")
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature="hot")
    _still_serving(server)


# JSON that Python's parser accepts but no sampler should: NaN, Infinity, huge numbers; seeds past 64 bits.
RAW_BAD_NUMBERS = [
    (b'"temperature": NaN', "temperature"),
    (b'"temperature": Infinity', "temperature"),
    (b'"temperature": 1e308', "temperature"),
    (b'"temperature": 1e999', "temperature"),
    (b'"top_p": NaN', "top_p"),
    (b'"seed": 1180591620717411303424', "seed"),  # 2**70
    (b'"seed": -1', "seed"),
    (b'"stop_token_ids": [10000000]', "stop_token_ids"),
]


@pytest.mark.parametrize("field,param", RAW_BAD_NUMBERS)
def test_numbers_finite_and_in_range(server, field, param):
    body = b'{"model": "tiny", "prompt": "x", "max_tokens": 2, ' + field + b"}"
    err = _is_openai_error(_post(server, "/v1/completions", content=body,
                                 headers={"Content-Type": "application/json"}), 400)
    assert err["param"] == param, err
    _still_serving(server)


def test_seed_at_the_top_of_the_range_with_n_choices(server):
    r = _post(server, "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "n": 2,
                                               "seed": 2**64 - 1, "temperature": 1.0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2  # seed + 1 wraps, it is not an error


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "a\\udfffb"]}', "prompt.1"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": "\\ud83d"}', "stop"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.0.content"),
    ("/v1/completions", b'{"model": "a\\ud800", "prompt": "x"}', "model"),
])
def test_lone_surrogates_are_400(server, path, body, param):
    err = _is_openai_error(_post(server, path, content=body, headers={"Content-Type": "application/json"}), 400)
    assert err["param"] == param and "surrogate" in err["message"]
    _still_serving(server)


def test_a_valid_surrogate_pair_is_text(server):
    body = b'{"model": "tiny", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'  # one code point, U+1F600
    assert _post(server, "/v1/completions", content=body, headers={"Content-Type": "application/json"}
                 ).status_code == 200


def test_body_that_is_not_utf8(server):
    body = b'{"model": "tiny", "prompt": "caf\xe9"}'  # latin-1 bytes
    err = _is_openai_error(_post(server, "/v1/completions", content=body,
                                 headers={"Content-Type": "application/json"}), 400)
    assert "UTF-8" in err["message"]
    _still_serving(server)


def test_chat_template_kwargs_may_override_defaults(server):
    msgs = [{"role": "user", "content": "hi"}]
    base = _post(server, "/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 1})
    cont = _post(server, "/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 1,
                                                       "chat_template_kwargs": {"add_generation_prompt": False}})
    assert base.status_code == cont.status_code == 200, cont.text
    # without the generation prompt (<role>ASSISTANT</role>) the prompt is shorter
    assert cont.json()["usage"]["prompt_tokens"] < base.json()["usage"]["prompt_tokens"]
    err = _is_openai_error(_post(server, "/v1/chat/completions", json={
        "model": "tiny", "messages": msgs, "chat_template_kwargs": {"messages": []}}), 400)
    assert err["param"] == "chat_template_kwargs"
    _still_serving(server)


@pytest.mark.parametrize("header", ["bearer test-key", "BEARER test-key", "Bearer  test-key"])
def test_bearer_scheme_is_case_insensitive(server, header):
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": header}, timeout=30,
                   json={"model": "tiny", "prompt": "ok", "max_tokens": 1})
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": "Basic test-key"}, timeout=30,
                   json={"model": "tiny", "prompt": "ok", "max_tokens": 1})
    assert r.status_code == 401


def test_metadata_fields_are_accepted_and_change_nothing(server):
    from ringlinear.server.protocol import IGNORED_METADATA
    values = {"user": "u-1", "metadata": {"k": "v"}, "store": True, "service_tier": "auto",
              "prompt_cache_key": "c", "safety_identifier": "s"}
    assert set(values) == set(IGNORED_METADATA)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    base = _post(server, "/v1/completions", json=body).json()["choices"][0]["text"]
    r = _post(server, "/v1/completions", json={**body, **values})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == base
