"""64 concurrent streaming clients x 3 rounds; afterwards every KV block and state slot is free again.

The test server has 32 state slots and 2,560 KV tokens, so clients also queue for slots and get preempted."""
import asyncio
import random


async def _client(c, rng, i):
    n = rng.randint(1, 24)
    if i % 2:
        stream = await c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "word " * rng.randint(1, 60)}], max_tokens=n,
            temperature=rng.choice([0, 0.8]), seed=i, stream=True, stream_options={"include_usage": True})
    else:
        stream = await c.completions.create(
            model="tiny", prompt=[rng.randrange(3, 384) for _ in range(rng.randint(1, 120))], max_tokens=n,
            temperature=rng.choice([0, 0.8]), seed=i, stream=True, stream_options={"include_usage": True})
    finish, usage = None, None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage:
            usage = chunk.usage
    assert finish in ("stop", "length"), finish
    assert 1 <= usage.completion_tokens <= n
    return usage.completion_tokens


def test_64_streaming_clients_3_rounds(server, wait_all_free):
    from openai import AsyncOpenAI

    async def main():
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="test-key", max_retries=0, timeout=120) as c:
            rng = random.Random(0)
            totals = []
            for _ in range(3):
                results = await asyncio.wait_for(
                    asyncio.gather(*(_client(c, rng, i) for i in range(64)), return_exceptions=True), 240)
                errors = [r for r in results if isinstance(r, BaseException)]
                assert not errors, errors[:3]
                totals.append(sum(results))
            return totals

    totals = asyncio.run(main())
    assert all(t > 0 for t in totals)
    free, stats = wait_all_free()
    assert free, stats
