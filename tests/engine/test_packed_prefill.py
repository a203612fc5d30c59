"""The engine's softmax prefill: pieces starting at position 0 go through one packed varlen call, pieces continuing
a cached prefix through their gathered cache rows, decode rows through the paged kernel (engine/context.py).

Checked against an independent fp64 computation (explicit masked softmax, KV head h // (H / KV)) at the fp32
tolerance of docs/numerics.md (CPU, fp32) or 1e-2 relative for bf16 inputs (CUDA: flash varlen, SDPA and the paged
kernel; bf16 rounding of the output alone is ~4e-3), and bitwise (CPU) against the per-piece call the packed one
replaces and against each request run alone."""
import pytest
import torch

from ringlinear.engine import SamplingParams
from ringlinear.engine.context import PagedContext
from ringlinear.engine.kv_cache import PagedKVCache
from ringlinear.engine.state_pool import StatePool
from ringlinear.ops.attention import reference

H, KV, D, BS = 4, 2, 64, 16
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE, TOL = (torch.bfloat16, 1e-2) if DEV == "cuda" else (torch.float32, 1e-5)


def _attend64(q, k, v, scale):
    """q [Tq, H, D] at the last Tq of the Tk positions of k, v [Tk, KV, D]; fp64 on the CPU, no SDPA."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    Tq, Tk = q.shape[0], k.shape[0]
    kh = k.double()[:, torch.arange(H) // (H // KV)]  # [Tk, H, D]
    vh = v.double()[:, torch.arange(H) // (H // KV)]
    s = torch.einsum("qhd,khd->hqk", q.double(), kh) * scale
    allowed = torch.arange(Tk)[None, :] <= torch.arange(Tk - Tq, Tk)[:, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", p, vh)


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", [
    # (start, new tokens) per sequence; decode rows (one token) first, as the scheduler orders them
    [(0, 9), (0, 5), (0, 12)],                  # fresh pieces only: the packed call's output is the layer's
    [(6, 1), (0, 7), (20, 5), (0, 3), (0, 21)],  # decode, fresh, prefix, fresh, fresh: fresh rows not adjacent
    [(3, 1), (17, 1), (4, 6), (30, 4)],         # decode and prefix pieces, nothing fresh
    [(9, 1), (0, 11)],                          # decode then one fresh piece
    [(6, 1), (20, 5), (0, 7), (15, 4), (0, 3)],  # prefix pieces not adjacent: their rows are an index
])
def test_softmax_prefill_mixed_pieces(layout):
    gen = torch.Generator().manual_seed(len(layout))
    num_decode = sum(1 for _, n in layout if n == 1)
    kv = PagedKVCache([0], num_blocks=64, block_size=BS, num_kv_heads=KV, head_dim=D, dtype=DTYPE, device=DEV)
    states = StatePool([], len(layout), H, D, DEV)
    perm = torch.randperm(64, generator=gen).tolist()  # scattered blocks, so the gathers are exercised
    tables, prefixes = [], []
    K, V = kv.flat(0)
    for i, (start, n) in enumerate(layout):
        blocks = -(-(start + n) // BS)
        tables.append(perm[:blocks])
        perm = perm[blocks:]
        pk, pv = (torch.randn(start, KV, D, generator=gen).to(DEV, DTYPE) for _ in range(2))
        rows = kv.token_rows(tables[-1], 0, start).to(DEV)
        K[rows], V[rows] = pk, pv  # the cached prefix
        prefixes.append((pk, pv))
    T = sum(n for _, n in layout)
    q = torch.randn(T, H, D, generator=gen).to(DEV, DTYPE)
    k, v = (torch.randn(T, KV, D, generator=gen).to(DEV, DTYPE) for _ in range(2))
    ctx = PagedContext(kv, states, list(range(len(layout))), tables, [s for s, _ in layout],
                       [n for _, n in layout], num_decode, torch.device(DEV))
    scale = D ** -0.5
    out = ctx.softmax_attention(0, q, k, v, scale)
    for i, (start, n) in enumerate(layout):
        s, e = ctx.cu[i], ctx.cu[i + 1]
        pk, pv = prefixes[i]
        want = _attend64(q[s:e], torch.cat([pk, k[s:e]]), torch.cat([pv, v[s:e]]), scale)
        assert _rel(out[s:e].cpu(), want.cpu()) < TOL, (i, start, n)
        if DEV == "cpu" and start == 0 and n > 1:  # the packed call equals the per-piece call it replaced
            assert torch.equal(out[s:e], reference.attention_with_prefix(q[s:e], k[s:e], v[s:e], scale))
        rows = kv.token_rows(tables[i], start, start + n).to(DEV)
        assert torch.equal(K[rows], k[s:e]) and torch.equal(V[rows], v[s:e])  # the new rows are cached


def test_engine_step_mixing_cached_and_fresh_pieces_equals_cold_runs(make_llm, random_prompts, run_engine,
                                                                     monkeypatch):
    """One step carries a prefix-cache hit and fresh prompts: every request gets bitwise the tokens and log-probs
    of a cold run alone (CPU)."""
    system = random_prompts(1, 128, 128, seed=80)[0]
    fresh = random_prompts(3, 20, 60, seed=81)
    prompts = [system + [5, 6, 7], system + [9, 10], *fresh]
    params = [SamplingParams(max_tokens=6, temperature=0.8 if i % 2 else 0, seed=i, top_logprobs=2,
                             ignore_eos=True) for i in range(len(prompts))]
    cold = make_llm(enable_prefix_caching=False)
    want = [cold.generate([p], sp)[0] for p, sp in zip(prompts, params)]

    seen = []
    orig = PagedContext._plan_softmax_prefill

    def spy(self, kv, block_tables, starts, seq_lens, nd, device):
        orig(self, kv, block_tables, starts, seq_lens, nd, device)
        seen.append((bool(self.prefix_groups), self.fresh_rows is not None))
    monkeypatch.setattr(PagedContext, "_plan_softmax_prefill", spy)
    eng = make_llm().engine
    eng.add_request(prompts[0], params[0], "r0")
    got = run_engine(eng)
    for i in range(1, len(prompts)):
        eng.add_request(prompts[i], params[i], f"r{i}")
    got.update(run_engine(eng))
    assert eng.stats()["prefix_cache_hits"] == 1
    assert any(n_prefix and has_fresh for n_prefix, has_fresh in seen), seen  # a step really mixed both
    for i, w in enumerate(want):
        g = got[f"r{i}"]
        assert g.token_ids == w.token_ids and g.logprobs == w.logprobs and g.top_logprobs == w.top_logprobs


def test_prefix_pieces_in_bounded_groups(monkeypatch):
    """Prefixed pieces whose gathered contexts exceed PREFIX_GATHER_ROWS go through several packed calls; every
    piece still gets its own exact attention."""
    from ringlinear.engine import context as C
    monkeypatch.setattr(C, "PREFIX_GATHER_ROWS", 50)
    layout = [(3, 1), (20, 5), (30, 4), (12, 9), (0, 6), (25, 2)]
    gen = torch.Generator().manual_seed(11)
    kv = PagedKVCache([0], num_blocks=64, block_size=BS, num_kv_heads=KV, head_dim=D, dtype=DTYPE, device=DEV)
    states = StatePool([], len(layout), H, D, DEV)
    tables, prefixes, perm = [], [], torch.randperm(64, generator=gen).tolist()
    K, V = kv.flat(0)
    for start, n in layout:
        blocks = -(-(start + n) // BS)
        tables.append(perm[:blocks])
        perm = perm[blocks:]
        pk, pv = (torch.randn(start, KV, D, generator=gen).to(DEV, DTYPE) for _ in range(2))
        rows = kv.token_rows(tables[-1], 0, start).to(DEV)
        K[rows], V[rows] = pk, pv
        prefixes.append((pk, pv))
    T = sum(n for _, n in layout)
    q = torch.randn(T, H, D, generator=gen).to(DEV, DTYPE)
    k, v = (torch.randn(T, KV, D, generator=gen).to(DEV, DTYPE) for _ in range(2))
    ctx = PagedContext(kv, states, list(range(len(layout))), tables, [s for s, _ in layout],
                       [n for _, n in layout], 1, torch.device(DEV))
    assert len(ctx.prefix_groups) == 3  # contexts 25, 34, 21, 27 under a 50-row budget: [25], [34], [21, 27]
    out = ctx.softmax_attention(0, q, k, v, D ** -0.5)
    for i, (start, n) in enumerate(layout):
        s, e = ctx.cu[i], ctx.cu[i + 1]
        pk, pv = prefixes[i]
        want = _attend64(q[s:e], torch.cat([pk, k[s:e]]), torch.cat([pv, v[s:e]]), D ** -0.5)
        assert _rel(out[s:e].cpu(), want.cpu()) < TOL, (i, start, n)
