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
