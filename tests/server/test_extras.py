"""/tokenize, /detokenize (vLLM's bodies), /version, /metrics (Prometheus text, through prometheus-client's own
parser) and `ringlinear serve --chat-template FILE`."""
import sys

import httpx
import pytest

import ringlinear

AUTH = {"Authorization": "Bearer test-key"}


def _post(server, path, body, headers=AUTH):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def test_tokenize_and_detokenize(server):
    tok = server.engine.engine.tokenizer
    r = _post(server, "/tokenize", {"model": "tiny", "prompt": "def add(a, b):"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("def add(a, b):", add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    chat = _post(server, "/tokenize", {"messages": msgs, "return_token_strs": True}).json()  # model is optional
    assert chat["tokens"] == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert len(chat["token_strs"]) == chat["count"]
    no_gen = _post(server, "/tokenize", {"messages": msgs, "add_generation_prompt": False}).json()
    assert no_gen["count"] < chat["count"]
    back = _post(server, "/detokenize", {"model": "tiny", "tokens": chat["tokens"]}).json()
    assert back["prompt"] == tok.apply_chat_template(msgs, add_generation_prompt=True)


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"model": "tiny"}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "max_tokens": 3}, 400, "max_tokens"),
    ("/detokenize", {"tokens": [1, 99999]}, 400, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
])
def test_bad_tokenize_requests(server, path, body, status, param):
    r = _post(server, path, body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert _post(server, "/tokenize", {"prompt": "ok"}).status_code == 200


def test_tokenize_needs_the_api_key_version_does_not(server):
    assert _post(server, "/tokenize", {"prompt": "x"}, headers={}).status_code == 401
    assert _post(server, "/detokenize", {"tokens": [1]}, headers={}).status_code == 401
    v = httpx.get(server.url + "/version", timeout=10).json()
    assert v["version"] == ringlinear.__version__ and v["torch"]


def _scrape(server):
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics(server, client, wait_all_free):
    pytest.importorskip("prometheus_client", reason="/metrics needs prometheus-client")
    ok = (("route", "/v1/completions"), ("status", "200"))
    bad = (("route", "/v1/completions"), ("status", "400"))
    before = _scrape(server)
    r = client.completions.create(model="tiny", prompt=[[5, 6, 7, 8]], max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    list(client.completions.create(model="tiny", prompt=[[5, 6]], max_tokens=3, stream=True,
                                   extra_body={"ignore_eos": True}))
    assert _post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}).status_code == 400
    assert wait_all_free()[0]
    after = _scrape(server)

    def grew(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)
    assert grew("ringlinear_requests_total", ok) == 2 and grew("ringlinear_requests_total", bad) == 1
    assert grew("ringlinear_prompt_tokens_total") == 6 and grew("ringlinear_generation_tokens_total") == 8
    assert grew("ringlinear_time_to_first_token_seconds_count") == 2
    assert grew("ringlinear_request_latency_seconds_count") == 2
    stats = httpx.get(server.url + "/stats", timeout=10).json()
    assert after[("ringlinear_requests_running", ())] == 0 and after[("ringlinear_requests_waiting", ())] == 0
    assert after[("ringlinear_kv_blocks_used", ())] + after[("ringlinear_kv_blocks_free", ())] == \
        stats["total_kv_blocks"]
    assert after[("ringlinear_state_slots_free", ())] == stats["total_state_slots"]
    assert ("ringlinear_preemptions_total", ()) in after
    for name, value in stats.items():  # every numeric engine stat, as it is
        if name != "in_flight":
            assert after[(f"ringlinear_engine_{name}", ())] == value


def test_metrics_without_prometheus_client(server, monkeypatch):
    from fastapi.testclient import TestClient

    from ringlinear.server.app import create_app
    from ringlinear.server.metrics import METRICS_MISSING
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    app = create_app(server.engine, "tiny")  # the live server's engine; the lifespan (shutdown) never runs
    r = TestClient(app).get("/metrics")
    assert r.status_code == 501 and r.json()["error"]["message"] == METRICS_MISSING
    assert TestClient(app).get("/health").json()["status"] == "ok"


def test_chat_template_flag_replaces_the_checkpoints(tiny_dir, tmp_path):
    from ringlinear.cli import build_parser
    from ringlinear.server.cli import build_engine
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}[assistant] {% endif %}")
    args = build_parser().parse_args(["serve", "--model", tiny_dir, "--device", "cpu", "--num-kv-blocks", "16",
                                      "--chat-template", str(path)])
    import gc
    gc.unfreeze()
    try:
        engine = build_engine(args)
        assert engine.chat_prompt([{"role": "user", "content": "hi"}]) == "[user] hi\n[assistant] "
        # the server's engine lives until exit: what exists once it is built is left out of full collections
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()  # back to the oldest generation: later collections see them again
