"""Structured output through the engine (xgrammar): JSON-schema output parses and validates, tagged JSON has its
tags, a schema the library refuses is a RequestError naming `structured`, the mask keeps batch invariance, and
without xgrammar the error says how to install it."""
import json
import sys

import pytest

from ringlinear.engine import RequestError, SamplingParams
from ringlinear.engine.structured import XGRAMMAR_MISSING

xgrammar = pytest.importorskip("xgrammar", reason="structured output needs xgrammar (pip install xgrammar)")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n", "tags"],
          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


def _validate(obj, schema):
    try:
        import jsonschema
    except ImportError:  # the required keys and their types, by hand
        assert set(obj) == set(schema["required"]) and isinstance(obj["ok"], bool) and isinstance(obj["n"], int)
        return
    jsonschema.validate(obj, schema)


def test_json_schema_output_parses_and_validates(make_llm, random_prompts):
    llm = make_llm()
    prompts = random_prompts(4, 5, 80, seed=50)
    params = [SamplingParams(max_tokens=120, temperature=t, seed=i, structured={"type": "json_schema", "schema": SCHEMA})
              for i, t in enumerate((0.0, 1.0, 1.0, 0.8))]
    for o in llm.generate(prompts, params):
        assert o.finish_reason == "stop", o.text
        _validate(json.loads(o.text), SCHEMA)
        assert o.token_ids[-1] in llm.tokenizer.stop_token_ids  # ended by the EOS the grammar allowed last


def test_tagged_json_is_wrapped_in_its_tags(make_llm, random_prompts):
    llm = make_llm()
    a = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
         "additionalProperties": False}
    b = {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"], "additionalProperties": False}
    spec = {"type": "tagged_json", "begin": "<tool_call>", "end": "</tool_call>", "schemas": [a, b]}
    for seed in range(3):
        o = llm.generate(random_prompts(1, 10, 10, seed=51)[0], SamplingParams(
            max_tokens=60, temperature=1.0, seed=seed, structured=spec))[0]
        assert o.text.startswith("<tool_call>") and o.text.endswith("</tool_call>"), o.text
        obj = json.loads(o.text[len("<tool_call>"):-len("</tool_call>")])
        assert obj in ({"city": "Paris"}, {"city": "Rome"}, {"x": True}, {"x": False})


def test_masked_sampling_is_batch_invariant(make_llm, random_prompts):
    llm = make_llm()
    target = random_prompts(1, 70, 70, seed=52)[0]
    sp = SamplingParams(max_tokens=60, temperature=1.0, seed=9, logprobs=True,
                        structured={"type": "json_schema", "schema": SCHEMA})
    alone = llm.generate([target], sp)[0]
    others = random_prompts(3, 5, 120, seed=53)
    mixed = llm.generate([others[0], target] + others[1:],
                         [SamplingParams(max_tokens=20, structured={"type": "json_object"}, seed=2), sp,
                          SamplingParams(max_tokens=7, temperature=0), SamplingParams(max_tokens=9, seed=3)])[1]
    assert (mixed.token_ids, mixed.logprobs) == (alone.token_ids, alone.logprobs)


def test_bad_grammar_and_bad_shapes_are_request_errors(make_llm):
    llm = make_llm()
    with pytest.raises(RequestError) as e:
        llm.engine.prepare([5, 6], SamplingParams(structured={"type": "json_schema",
                                                              "schema": {"type": "nonsense-type"}}))
    assert e.value.param == "structured" and "rejected" in str(e.value)
    with pytest.raises(ValueError, match="structured"):
        SamplingParams(structured={"type": "regex"})
    with pytest.raises(ValueError, match="schema"):
        SamplingParams(structured={"type": "json_schema"})
    assert llm.generate([[5, 6]], SamplingParams(max_tokens=2))[0].finish_reason  # still serving


def test_without_xgrammar_the_error_says_how_to_install(make_llm, monkeypatch):
    llm = make_llm()
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now raises ImportError
    with pytest.raises(RequestError) as e:
        llm.engine.prepare([5, 6], SamplingParams(structured={"type": "json_object"}))
    assert str(e.value) == XGRAMMAR_MISSING and e.value.param == "structured"
