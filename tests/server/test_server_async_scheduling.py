"""The server over an engine with async scheduling (engine/overlap.py): concurrent streams give the texts the
synchronous server gives the same requests (CPU: batch invariant), a client that disconnects mid-stream is
cancelled while lookaheads run, and every block and slot is free afterwards."""
import asyncio
import time

import httpx
import pytest
import torch

API_KEY, MODEL = "test-key", "tiny"  # as conftest's server
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def async_server(start_server):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # 8 slots for 16 clients: requests queue while lookaheads run
    live = start_server(max_num_seqs=8, num_kv_blocks=160, block_size=16, prefill_chunk=64,
                        max_num_batched_tokens=256, max_model_len=512, async_scheduling=True)
    yield live
    live.stop()
    torch.set_num_threads(threads)


def _stats(server):
    return httpx.get(server.url + "/stats", timeout=10).json()


async def _complete(c, i):
    stream = await c.completions.create(model=MODEL, prompt=[3 + (7 * i + j) % 380 for j in range(5 + 9 * i)],
                                        max_tokens=6 + 3 * i, temperature=0 if i % 2 else 0.8, seed=i,
                                        stream=True, extra_body={"ignore_eos": i % 3 != 0})
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
    return text


def _run(url, n):
    from openai import AsyncOpenAI

    async def main():
        async with AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
            return await asyncio.wait_for(asyncio.gather(*(_complete(c, i) for i in range(n))), 240)
    return asyncio.run(main())


def _wait_free(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        s = _stats(server)
        free = (s["in_flight"] == 0 and s["running"] == 0 and s["waiting"] == 0
                and s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"])
        if free or time.monotonic() > deadline:
            return free, s


def test_streams_equal_the_sync_server_and_disconnects_free(async_server, server):
    got = _run(async_server.url, 16)
    assert _stats(async_server)["async_scheduled_steps"] > 10
    assert got == _run(server.url, 16)

    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 400, "stream": True, "ignore_eos": True}
    aborted = _stats(async_server)["aborted"]
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", async_server.url + "/v1/completions", json=body, headers=AUTH) as r:
            lines = r.iter_lines()
            for _ in range(12):
                next(lines)
    free, stats = _wait_free(async_server)
    assert free and stats["aborted"] == aborted + 1, stats
