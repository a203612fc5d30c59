"""A client that goes away mid-request has its request cancelled and its memory freed."""
import httpx

AUTH = {"Authorization": "Bearer test-key"}


def _stats(server):
    return httpx.get(server.url + "/stats", timeout=10).json()


def test_stream_disconnect_cancels_and_frees(server, wait_all_free):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "stream": True, "ignore_eos": True}
    aborted = _stats(server)["aborted"]
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert all(line.startswith("data: ") or not line for line in got)
            assert _stats(server)["running"] == 1
    # The connection is closed: the request is aborted (not run to 400 tokens) and its memory freed.
    free, stats = wait_all_free(timeout=10)
    assert free and stats["aborted"] == aborted + 1, stats


def test_non_streaming_disconnect_cancels_and_frees(server, wait_all_free):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 480,
            "ignore_eos": True}
    aborted = _stats(server)["aborted"]
    try:
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=0.5)
        raise AssertionError("expected the client to time out")
    except httpx.ReadTimeout:
        pass
    free, stats = wait_all_free(timeout=10)
    assert free and stats["aborted"] == aborted + 1, stats


def test_disconnect_before_the_first_byte_frees(server, wait_all_free):
    import json
    import socket
    aborted = _stats(server)["aborted"]
    for stream in (True, False):
        body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 450, "stream": stream,
                           "ignore_eos": True}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head + body)
        # closed right away: the request may or may not have reached the engine; either way nothing leaks
    free, stats = wait_all_free(timeout=20)
    assert free and stats["in_flight"] == 0 and stats["aborted"] <= aborted + 2, stats
