"""Tool calls: the Ring-2.0 `<tool_call>{json}</tool_call>` parser (whole and streamed, every split point), and
end to end through the official `openai` client: a forced call (tool_choice naming a function or "required",
through the grammar), "auto" with the engine's output scripted in-process, and the round trip of an assistant
message with tool_calls and a tool message through the chat template."""
import json

import openai
import pytest

from ringlinear.engine import sampler
from ringlinear.server import tools

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
# Small schemas: the tiny tokenizer spends ~1.5 characters a token and the test server's context is 512 tokens.
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}}}}


# ---------------------------------------------------------------------- parser
@pytest.mark.parametrize("text,content,calls", [
    ("plain text", "plain text", []),
    (CALL, None, [("get_weather", {"city": "Paris"})]),
    ("Let me check. " + CALL, "Let me check. ", [("get_weather", {"city": "Paris"})]),
    (CALL + "\n" + CALL.replace("Paris", "Rome") + "\n", None,
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    (CALL + " and after", " and after", [("get_weather", {"city": "Paris"})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', None, [("f", {"x": 1})]),
    ('<tool_call>{"name": "f", "parameters": {"x": 2}}</tool_call>', None, [("f", {"x": 2})]),
    ("<tool_call>not json</tool_call> rest", "<tool_call>not json</tool_call> rest", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('x <tool_call>{"name": "f", "arguments": {', 'x <tool_call>{"name": "f", "arguments": {', []),
    ("a < b <tool", "a < b <tool", []),
    ("", "", []),
])
def test_parse(text, content, calls):
    got_content, got = tools.parse(text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)
    # streamed in pieces of every size: the same calls, the content concatenated equals the whole
    for size in range(1, len(text) + 1):
        p = tools.ToolCallParser()
        events = [e for i in range(0, len(text), size) for e in p.push(text[i:i + size])] + p.finish()
        streamed = "".join(v for k, v in events if k == "content")
        assert streamed == (content or "")
        assert [c["function"]["arguments"] for k, c in events if k == "tool_call"] == \
            [c["function"]["arguments"] for c in got]


def test_parallel_tool_calls_false_keeps_the_first():
    content, calls = tools.parse(CALL + CALL, parallel=False)
    assert len(calls) == 1 and content == CALL


def test_tools_and_tool_choice_checked():
    assert not tools.check(None, None).parse and tools.check([WEATHER], None).parse  # OpenAI's defaults
    assert tools.check([WEATHER], "none").parse is False
    assert tools.check([WEATHER, CLOCK], "required").forced == [WEATHER["function"], CLOCK["function"]]
    named = tools.check([WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}})
    assert named.forced == [CLOCK["function"]]
    for t, choice, param in (([], "required", "tool_choice"), ([WEATHER], {"type": "function", "function": {
            "name": "nope"}}, "tool_choice"), ([WEATHER], "sometimes", "tool_choice"),
            ([{"type": "code_interpreter"}], None, "tools.0"), ([{"type": "function", "function": {"name": "a b"}}],
                                                              None, "tools.0.function.name"),
            ([WEATHER, WEATHER], None, "tools"), ([{"type": "function", "function": {"name": "f", "parameters": 3}}],
                                                  None, "tools.0.function.parameters")):
        with pytest.raises(tools.ToolError) as e:
            tools.check(t, choice)
        assert e.value.param == param


# ---------------------------------------------------------------------- end to end
MSGS = [{"role": "user", "content": "Weather?"}]


@pytest.fixture
def xgrammar():
    return pytest.importorskip("xgrammar", reason="a forced tool call needs xgrammar (pip install xgrammar)")


def _args(call):
    return json.loads(call.function.arguments)


def test_forced_call_round_trips_through_the_client(client, server, xgrammar):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, CLOCK], tool_choice=named,
                                       max_tokens=100, temperature=1.0, seed=3)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and _args(call)["city"] in ("Paris", "Rome")

    # streamed: the client accumulates delta.tool_calls into the same call
    stream = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, CLOCK], tool_choice=named,
                                            max_tokens=100, temperature=1.0, seed=3, stream=True)
    deltas = [ch.choices[0] for ch in stream if ch.choices]
    streamed = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == \
        [(0, "get_weather", call.function.arguments)]
    assert deltas[-1].finish_reason == "tool_calls" and not "".join(d.delta.content or "" for d in deltas)

    # "required": one of the tools
    req = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, CLOCK], tool_choice="required",
                                         max_tokens=100, temperature=1.0, seed=4)
    assert req.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")

    # the assistant turn with its tool call and the tool's answer go back in and are rendered by the template
    follow = MSGS + [c.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], max_tokens=3, temperature=0)
    tok = server.engine.engine.tokenizer
    rendered = server.engine.engine.chat_prompt(follow, tools=[WEATHER])
    assert f'<tool_call>{{"name": "get_weather", "arguments": {call.function.arguments}}}</tool_call>' in rendered
    assert "<tool_response>sunny, 21 C</tool_response>" in rendered and '"get_weather"' in rendered.split("<role>")[1]
    assert r2.usage.prompt_tokens == len(tok.encode(rendered))


@pytest.fixture
def scripted(monkeypatch, server):
    """Requests seeded 424242 emit `scripted.text` then EOS: the engine's sampler patched in-process (the random
    model would never write a tool call on its own)."""
    tok = server.engine.engine.tokenizer
    real = sampler.sample_row

    class Script:
        text = ""

    def fake(logits, seq, processed=None):
        if seq.params.seed != 424242:
            return real(logits, seq, processed)
        ids = tok.encode(Script.text) + [tok.stop_token_ids[0]]
        return ids[len(seq.output_token_ids)], None, None
    monkeypatch.setattr(sampler, "sample_row", fake)
    return Script


def test_auto_parses_calls_out_of_free_text(client, scripted):
    scripted.text = "Let me look. " + CALL + "\n"
    kw = dict(model="tiny", messages=MSGS, tools=[WEATHER], max_tokens=100, temperature=1.0, seed=424242)
    c = client.chat.completions.create(**kw).choices[0]
    assert c.message.content == "Let me look. \n" and c.finish_reason == "tool_calls"
    assert [(t.function.name, _args(t)) for t in c.message.tool_calls] == [("get_weather", {"city": "Paris"})]
    deltas = [ch.choices[0] for ch in client.chat.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(d.delta.content or "" for d in deltas) == "Let me look. \n"
    calls = [t for d in deltas for t in (d.delta.tool_calls or [])]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == \
        [(0, "get_weather", {"city": "Paris"})]
    assert deltas[-1].finish_reason == "tool_calls"
    # tool_choice "none": the text is the content, untouched
    none = client.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert none.message.content == scripted.text and none.message.tool_calls is None
    assert none.finish_reason == "stop"


def test_bad_tool_requests_are_400s(client, server, xgrammar):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, tool_choice="required")
    assert e.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, tools=[{"type": "function", "function": {}}])
    assert e.value.param == "tools.0.function.name"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], tool_choice="required",
                                       response_format={"type": "json_object"})
    assert e.value.param == "response_format"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense-type"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, tools=[bad], tool_choice="required")
    assert e.value.param == "tool_choice" and "rejected" in e.value.message
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens == 2
