"""Large requests. Three defences, each tested while another client streams: the body limit (413, whether the
size is declared or only seen while reading), the context check before tokenising (a text longer than the context
can hold is refused uncounted), and tokenising on a worker thread (for tokenizers that prove no bound). None of
them may delay the stream's next chunk by 200 ms, and memory returns to its level before."""
import contextlib
import gc
import json
import os
import threading
import time

import httpx
import pytest

AUTH = {"Authorization": "Bearer test-key", "Content-Type": "application/json"}
MB = 1_000_000


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:  # the server runs in this process
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _post(server, path, body: bytes):
    # No retry on a reset: an oversized body is read to its end before the 413 (server/app.py DRAIN_BYTES), and
    # before that about 1 post in 7 lost its 413 to a reset (a loop of 10 MB posts, 2026-12-02).
    return httpx.post(server.url + path, content=body, headers=AUTH, timeout=60)


def _still_serving(server):
    # ignore_eos: the tokens are sampled, and an EOS drawn first would end the answer at 1 token (one CI run here)
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=30,
                   json={"model": "tiny", "prompt": "ok", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def _body(kind: str, size: int) -> tuple[str, bytes]:
    """(path, body) of a request whose prompt is about `size` bytes of JSON."""
    if kind == "ids":
        return "/v1/completions", json.dumps({"model": "tiny", "prompt": [5] * (size // 3)}).encode()
    text = "word " * (size // 5)
    if kind == "chat":
        return "/v1/chat/completions", json.dumps({"model": "tiny",
                                                   "messages": [{"role": "user", "content": text}]}).encode()
    return "/v1/completions", json.dumps({"model": "tiny", "prompt": text}).encode()


@contextlib.contextmanager
def _streaming(server):
    """A client streaming 480 tokens meanwhile; yields the arrival times of its chunks (filled as they come)."""
    chunks, started = [], threading.Event()

    def run():
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 480, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    chunks.append(time.monotonic())
                    if len(chunks) == 5:
                        started.set()

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(30)
    yield chunks
    t.join(60)


def _longest_gap(chunks, a, b) -> float:
    """The longest wait for a stream chunk that arrived while [a, b] was going on (or just after)."""
    assert chunks[-1] > b, "the stream ended before the big request did"
    return max(y - x for x, y in zip(chunks, chunks[1:]) if a <= y <= b + 0.2)


def _run_while_streaming(server, cases):
    """cases: (label, path, body, expected status, expected code). Returns {label: (ms, longest gap ms)}."""
    for _, path, body, status, _ in cases:  # warm-up: first-use allocations are not what is measured
        assert _post(server, path, body).status_code == status
    rss0 = _rss()
    seen = {}
    with _streaming(server) as chunks:
        for label, path, body, status, code in cases:
            t0 = time.monotonic()
            r = _post(server, path, body)
            t1 = time.monotonic()
            assert r.status_code == status and r.json()["error"]["code"] == code, (label, r.text[:300])
            seen[label] = (t0, t1)
    del cases, body
    deadline = time.monotonic() + 3  # the server trims after the response has gone out: allow it a moment
    while (rss1 := _rss()) >= 1.1 * rss0 and time.monotonic() < deadline:
        time.sleep(0.1)
    out = {label: (1000 * (b - a), 1000 * _longest_gap(chunks, a, b)) for label, (a, b) in seen.items()}
    for label, (ms, gap) in out.items():
        print(f"{label:28s} answered in {ms:5.0f} ms; longest stream gap meanwhile {gap:4.0f} ms")
    print(f"RSS {rss0 / 2**20:.0f} MiB before, {rss1 / 2**20:.0f} MiB after")
    assert all(gap < 200 for _, gap in out.values()), out
    assert rss1 < 1.1 * rss0, (rss0, rss1)
    _still_serving(server)


def test_10mb_prompts_get_413_without_stalling(server):
    # The test server's limit is the default for max_model_len 512: 1 MiB.
    _run_while_streaming(server, [(f"10 MB {kind}: body limit", *_body(kind, 10 * MB), 413, "request_too_large")
                                  for kind in ("text", "chat", "ids")])


def test_prompts_under_the_limit_refused_before_tokenising(server):
    _run_while_streaming(server, [(f"0.9 MB {kind}: context check", *_body(kind, 900_000), 400,
                                   "context_length_exceeded") for kind in ("text", "chat", "ids")])


def test_tokenising_runs_on_a_worker_thread(server, monkeypatch):
    # A tokenizer that proves no character bound: the 0.9 MB prompt is tokenised in full (about 200k tokens),
    # on the worker pool, with the GIL released, while the stream goes on.
    tok = server.engine.engine.tokenizer
    threads = []
    encode = tok.encode

    def spy(text, *a, **k):
        threads.append(threading.current_thread().name)
        return encode(text, *a, **k)
    monkeypatch.setattr(tok, "max_chars_per_token", None)
    monkeypatch.setattr(tok, "encode", spy)
    _run_while_streaming(server, [(f"0.9 MB {kind}: tokenised", *_body(kind, 900_000), 400,
                                   "context_length_exceeded") for kind in ("text", "chat")])
    assert threads and all(t.startswith("ringlinear-worker") for t in threads), threads


@pytest.mark.parametrize("declared", [True, False])
def test_body_limit_on_declared_and_streamed_size(server, declared):
    body = json.dumps({"model": "tiny", "prompt": "x" * (2 << 20)}).encode()
    content = body if declared else (body[i:i + 65536] for i in range(0, len(body), 65536))  # chunked
    r = httpx.post(server.url + "/v1/completions", content=content, headers=AUTH, timeout=60)
    assert r.status_code == 413, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "--max-request-bytes" in err["message"]
    _still_serving(server)


def test_oversized_bodies_are_read_to_the_end_not_reset(server):
    """60 posts of 10 MB in a row all read their 413. Before the drain some got a reset instead (the server closed
    with the client's bytes unread): this test failed 2 of 3 runs then, 2026-12-02."""
    path, body = _body("text", 10 * MB)
    codes = [_post(server, path, body).status_code for _ in range(60)]
    assert codes == [413] * 60, codes
    _still_serving(server)


def test_a_body_declared_past_the_drain_bound_is_answered_at_once(server):
    """Content-Length of 1 TB, one byte sent after the headers: the 413 comes without waiting for the body (a
    drain without its bound would hang here until the socket's timeout)."""
    import socket
    from ringlinear.server.app import DRAIN_BYTES
    size = 10**12
    assert size > DRAIN_BYTES
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n{{".encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            part = s.recv(65536)
            assert part, reply
            reply += part
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    _still_serving(server)
