"""AsyncEngine: the engine on its own thread, driven from asyncio."""
import asyncio

import pytest

from ringlinear.engine import EngineConfig, LLMEngine, RequestError, SamplingParams
from ringlinear.engine.async_engine import AsyncEngine, EngineDeadError


@pytest.fixture
def engine(tiny_dir):
    cfg = EngineConfig(device="cpu", max_num_seqs=4, num_kv_blocks=64, prefill_chunk=64, max_num_batched_tokens=128)
    eng = AsyncEngine(LLMEngine(tiny_dir, cfg))
    yield eng
    eng.shutdown()


def _all_free(eng):
    s = eng.call(lambda e: e.stats())
    return s["free_kv_blocks"] == s["total_kv_blocks"] and s["free_state_slots"] == s["total_state_slots"]


def test_concurrent_requests_match_offline(engine, random_prompts):
    prompts = random_prompts(6, 5, 80, seed=50)
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    async def run():
        async def one(p):
            return [o async for o in engine.generate(p, sp)]
        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(run())
    offline = [engine.call(lambda e, p=p: _run_to_end(e, p, sp)) for p in prompts]
    for outs, ref in zip(results, offline):
        assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids == ref
        assert outs[-1].finished and sum(o.finished for o in outs) == 1
    assert engine.num_in_flight == 0 and _all_free(engine)


def _run_to_end(e, prompt, sp):
    rid = e.add_request(prompt, sp)
    while True:
        for o in e.step():
            if o.request_id == rid and o.finished:
                return o.token_ids


def test_leaving_early_aborts_and_frees(engine):
    async def run():
        agen = engine.generate([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
        async for o in agen:
            if len(o.token_ids) >= 3:
                break
        await agen.aclose()
        for _ in range(200):
            if _all_free(engine):
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(run())
    assert engine.call(lambda e: e.num_aborted) == 1


def test_invalid_request_raises_before_queueing(engine):
    async def run():
        with pytest.raises(RequestError, match="context limit"):
            engine.submit([7] * 3000, SamplingParams())
    asyncio.run(run())
    assert engine.num_in_flight == 0


def test_failed_step_fails_requests_and_marks_dead(engine):
    def boom(batch):
        raise RuntimeError("kernel exploded")
    engine.call(lambda e: setattr(e.runner, "execute", boom))

    async def run():
        with pytest.raises(EngineDeadError, match="kernel exploded"):
            async for _ in engine.generate([5, 6], SamplingParams(max_tokens=4)):
                pass
        with pytest.raises(EngineDeadError):
            engine.submit([5], SamplingParams())
    asyncio.run(run())
    assert not engine.alive
