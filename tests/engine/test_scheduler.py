"""Scheduling policy details that batch invariance depends on."""
from ringlinear.engine import SamplingParams


def _record_batches(eng):
    batches = []
    schedule = eng.scheduler.schedule

    def recording():
        b = schedule()
        batches.append([(s.seq.request_id, s.start, s.num_tokens) for s in b.seqs])
        return b
    eng.scheduler.schedule = recording
    return batches


def test_prefill_pieces_are_fixed_multiples_of_the_chunk(make_llm, random_prompts):
    # Budget 128 with a 64 chunk: a 150-token prompt is computed as 64 + 64 + 22 whatever else runs, and a
    # piece that does not fit the budget left waits instead of being cut.
    llm = make_llm(prefill_chunk=64, max_num_batched_tokens=128)
    eng = llm.engine
    batches = _record_batches(eng)
    for i, p in enumerate(random_prompts(3, 150, 150, seed=30)):
        eng.add_request(p, SamplingParams(max_tokens=3, temperature=0), f"r{i}")
    while eng.has_unfinished():
        eng.step()
    for b in batches:
        assert sum(n for _, _, n in b) <= 128
        kinds = [n == 1 for _, _, n in b]
        assert kinds == sorted(kinds, reverse=True)  # single-token entries (decode kernels) first
    for rid in ("r0", "r1", "r2"):
        pieces = [(s, n) for b in batches for r, s, n in b if r == rid and s < 150]
        assert pieces == [(0, 64), (64, 64), (128, 22)], (rid, pieces)
