#!/usr/bin/env python3
"""numerics="aligned" kernels on one CUDA GPU (bf16): bitwise checks and their price against the default kernels.

Bitwise, at Ring-mini shapes (H = 16, KV = 4, D = 128): (1) softmax attention rows from the training call over
packed documents == prefill pieces over paged blocks == token-by-token decode in batches; (2) lightning attention
positions from the aligned training forward == aligned prefill pieces + decode; (3) fixed-tile linear rows
independent of the batch; (4) fixed-order log-prob rows independent of the batch.
Price (same run): aligned vs default for training attention fwd+bwd, paged decode attention at batch 64, lightning
decode at batch 64, projections at decode and prefill sizes.

Run: PYTHONPATH=. python benchmarks/aligned.py [attention,lightning,rows,price,model | model-quick]; prints a table
and a final JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch

H, KV, D, BS = 16, 4, 128, 16


def ms(fn, warmup=5, rep=30):
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def rand(*shape, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


def paged(k, v, cu):
    lens = (cu[1:] - cu[:-1]).tolist()
    nblk = sum(-(-n // BS) for n in lens) + 1
    perm = torch.randperm(nblk).tolist()
    K = rand(nblk * BS, KV, D, seed=7)
    V = rand(nblk * BS, KV, D, seed=8)
    MB = max(-(-n // BS) for n in lens)
    bt = torch.zeros(len(lens), MB, dtype=torch.int32, device="cuda")
    for i, n in enumerate(lens):
        blocks = [perm.pop() for _ in range(-(-n // BS))]
        bt[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        pos = torch.arange(n, device="cuda")
        rows = bt[i].long()[pos // BS] * BS + pos % BS
        K[rows], V[rows] = k[int(cu[i]):int(cu[i + 1])], v[int(cu[i]):int(cu[i + 1])]
    return K, V, bt


def check_attention():
    from ringlinear.ops.attention.reference import causal_attention_varlen
    from ringlinear.ops.attention.triton_aligned import aligned_causal_varlen, aligned_forward
    lens = [1, 300, 1000, 2047]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda")
    T = int(cu[-1])
    q, k, v = rand(T, H, D, seed=1), rand(T, KV, D, seed=2), rand(T, KV, D, seed=3)
    train = aligned_causal_varlen(q, k, v, cu, D ** -0.5, max(lens))
    ref = causal_attention_varlen(q.float(), k.float(), v.float(), cu.cpu(), D ** -0.5)
    K, V, bt = paged(k, v, cu)
    pieces = torch.empty_like(q)
    for i, n in enumerate(lens):
        for s in range(0, n, 512):
            e = min(n, s + 512)
            rows = slice(int(cu[i]) + s, int(cu[i]) + e)
            pieces[rows], _ = aligned_forward(q[rows], K, V, torch.tensor([0, e - s], device="cuda"),
                                              torch.tensor([s], device="cuda"), D ** -0.5, e - s,
                                              block_tables=bt[i:i + 1], block_size=BS)
    decode_ok, checked = True, 0
    for t in list(range(0, max(lens), 97)) + [max(lens) - 1]:
        live = [i for i in range(len(lens)) if t < lens[i]]
        rows = torch.tensor([int(cu[i]) + t for i in live], device="cuda")
        o, _ = aligned_forward(q[rows], K, V, torch.arange(len(live) + 1, device="cuda"),
                               torch.full((len(live),), t, device="cuda"), D ** -0.5, 1,
                               block_tables=bt[live], block_size=BS)
        decode_ok &= torch.equal(o, train[rows])
        checked += len(live)
    return {"train_vs_ref_rel": float((train.float() - ref).norm() / ref.norm()),
            "train_eq_prefill_pieces": bool(torch.equal(train, pieces)), "train_eq_decode": bool(decode_ok),
            "decode_rows_checked": checked}


def check_lightning():
    from ringlinear.ops.lightning_attn import triton as T
    from ringlinear.ops.lightning_attn import triton_aligned as TA
    lens, prompts = [700, 64, 1500, 129], [513, 64, 1, 128]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda")
    N, Tt = len(lens), int(cu[-1])
    q, k, v = (rand(1, Tt, H, D, seed=s) for s in (4, 5, 6))
    g = -(torch.rand(H, device="cuda") * 0.7 + 0.003)
    train = T.lightning_attn(q, k, v, g, cu_seqlens=cu, aligned=True)[0][0]
    BT = TA.open_chunk_rows(D, D, q.dtype)
    state = torch.zeros(N + 1, H, D, D, device="cuda")
    ok, ov = (torch.zeros(N + 1, BT, H, D, device="cuda", dtype=q.dtype) for _ in range(2))
    out = torch.zeros(Tt, H, D, device="cuda", dtype=q.dtype)
    for n in range(N):
        for s in range(0, prompts[n], 512):
            e = min(prompts[n], s + 512)
            a, b = int(cu[n]) + s, int(cu[n]) + e
            out[a:b] = TA.lightning_attn_prefill_aligned(
                q[:, a:b], k[:, a:b], v[:, a:b], g, state, ok, ov, torch.tensor([n], device="cuda"),
                torch.tensor([0, e - s], device="cuda"), torch.tensor([s]))[0]
    for t in range(max(lens)):
        live = [n for n in range(N) if prompts[n] <= t < lens[n]]
        if live:
            rows = torch.tensor([int(cu[n]) + t for n in live], device="cuda")
            out[rows] = TA.lightning_attn_decode_aligned(q[0, rows], k[0, rows], v[0, rows], g, state, ok, ov,
                                                         torch.tensor(live, device="cuda"),
                                                         torch.full((len(live),), t, device="cuda"))
    ref = T.lightning_attn(q, k, v, g, cu_seqlens=cu)[0][0]
    bad = (train != out).flatten(1).any(1).nonzero().flatten().tolist()
    where = []
    for p_ in bad[:5]:  # (sequence, position, prefill or decode) of the first differing rows
        n = int((cu[1:] <= p_).sum())
        t = p_ - int(cu[n])
        where.append((n, t, "prefill" if t < prompts[n] else "decode"))
    return {"aligned_eq_served": bool(torch.equal(train, out)), "rows_differing": len(bad), "first": where,
            "aligned_vs_default_rel": float((train.float() - ref.float()).norm() / ref.float().norm())}


def check_rows():
    from ringlinear.ops.linear.triton import linear
    from ringlinear.ops.loss.triton import token_logprobs
    x, w = rand(1000, 2048, seed=9), rand(6144, 2048, seed=10)
    full = linear(x, w)
    lin_ok = all(torch.equal(linear(x[a:b], w), full[a:b]) for a, b in ((0, 1), (5, 12), (100, 164), (0, 999)))
    logits = rand(300, 157184, seed=11, dtype=torch.float32) * 4
    t = torch.randint(0, 157184, (300,), device="cuda")
    lp, _ = token_logprobs(logits, t, 0.8)
    lp_ok = all(torch.equal(token_logprobs(logits[a:b], t[a:b], 0.8)[0], lp[a:b]) for a, b in ((0, 1), (7, 70)))
    return {"linear_rows_invariant": bool(lin_ok), "logprob_rows_invariant": bool(lp_ok)}


def price():
    from ringlinear.ops.attention.flash_varlen import varlen_causal
    from ringlinear.ops.attention.triton import paged_decode_attention
    from ringlinear.ops.attention.triton_aligned import aligned_causal_varlen, aligned_forward
    from ringlinear.ops.lightning_attn import triton as T
    from ringlinear.ops.lightning_attn import triton_aligned as TA
    from ringlinear.ops.linear.triton import linear
    res = {}
    Tt = 8192
    cu = torch.tensor([0, 700, 2000, 2100, 4096, 5000, 6500, 8000, 8192], device="cuda", dtype=torch.int32)
    q, k, v = (rand(Tt, h, D, seed=s).requires_grad_() for s, h in ((1, H), (2, KV), (3, KV)))
    do = rand(Tt, H, D, seed=4)
    res["train_attn_fwd_bwd_ms"] = {
        "default": ms(lambda: torch.autograd.grad(varlen_causal(q, k, v, cu, D ** -0.5, 2000), (q, k, v), do)),
        "aligned": ms(lambda: torch.autograd.grad(aligned_causal_varlen(q, k, v, cu, D ** -0.5, 2000), (q, k, v), do))}
    for C in (4096, 32768):
        B = 64
        nb = -(-C // BS)
        K, V = rand(B * nb * BS, KV, D, seed=5), rand(B * nb * BS, KV, D, seed=6)
        bt = torch.arange(B * nb, device="cuda", dtype=torch.int32).view(B, nb)
        lens = torch.full((B,), C, device="cuda", dtype=torch.int32)
        qd = rand(B, H, D, seed=7)
        res[f"decode_attn_b64_ctx{C}_ms"] = {
            "default": ms(lambda: paged_decode_attention(qd, K, V, bt, lens, BS, D ** -0.5)),
            "aligned": ms(lambda: aligned_forward(qd, K, V, torch.arange(B + 1, device="cuda"),
                                                  (lens - 1).long(), D ** -0.5, 1, block_tables=bt, block_size=BS))}
    B = 64
    st = torch.randn(B + 1, H, D, D, device="cuda")
    ok, ov = (rand(B + 1, 64, H, D, seed=s) for s in (8, 9))
    qd, kd, vd = (rand(B, H, D, seed=s) for s in (10, 11, 12))
    g = -(torch.rand(H, device="cuda") * 0.7 + 0.003)
    slots = torch.arange(B, device="cuda")
    pos = torch.full((B,), 100, device="cuda")
    res["lightning_decode_b64_us"] = {
        "default": 1e3 * ms(lambda: T.lightning_attn_decode(qd, kd, vd, g, st, slot_ids=slots)),
        "aligned": 1e3 * ms(lambda: TA.lightning_attn_decode_aligned(qd, kd, vd, g, st, ok, ov, slots, pos))}
    for M in (64, 8192):
        x, w = rand(M, 2048, seed=13), rand(6144, 2048, seed=14)
        res[f"qkv_proj_M{M}_ms"] = {"default": ms(lambda: x @ w.t()), "aligned": ms(lambda: linear(x, w))}
    return res


def model_level(quick=False):
    """The tiny model and a 5-layer Ring-mini slice, bf16 weights, engine with CUDA graphs: align-check figures in
    both modes (aligned must be all zeros), and the price of aligned mode: prefill and decode through the engine,
    and the training step. quick: the tiny model's align-check only (the mini slice's kernels take minutes to
    compile in both modes)."""
    import time

    from ringlinear.engine import EngineConfig, LLMEngine, SamplingParams
    from ringlinear.models.presets import get_preset
    from ringlinear.models.modeling import RingLinearForCausalLM
    from ringlinear.rl.align_check import align_check
    out = {}
    shapes = [("tiny", get_preset("tiny"))]
    if not quick:
        shapes.append(("mini-5L", get_preset("ring-mini-linear-2.0").replace(num_hidden_layers=5)))
    for name, cfg in shapes:
        m = RingLinearForCausalLM.from_config(cfg.replace(torch_dtype="bfloat16"), dtype=torch.bfloat16,
                                              device="cuda", seed=0).eval()
        r = {}
        for mode in ("default", "aligned"):
            res = align_check(m, mode, n_prompts=8 if quick else 16, max_tokens=48, max_prompt=300)
            r[mode] = {k: res[k] for k in ("max_abs_dlogp", "mean_abs_dlogp", "kl_rollout_train", "frac_dp_gt_0.8",
                                           "tokens", "divergence")}
        if name == "mini-5L":
            for mode in ("default", "aligned"):
                torch.cuda.synchronize()
                eng = LLMEngine(model=m, config=EngineConfig(max_num_seqs=64, numerics=mode, num_kv_blocks=64 * 80,
                                                             max_num_batched_tokens=4096, prefill_chunk=512,
                                                             max_model_len=1200))
                prompt = torch.randint(10, cfg.vocab_size, (4096 - 64,)).tolist()
                sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
                eng2 = LLMEngine(model=m, config=EngineConfig(max_num_seqs=1, numerics=mode, num_kv_blocks=300,
                                                              max_num_batched_tokens=4096, prefill_chunk=4096,
                                                              cuda_graphs=False))
                for _ in range(2):  # the first run compiles
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    eng2.add_request(prompt, sp)
                    while eng2.has_unfinished():
                        eng2.step()
                    torch.cuda.synchronize()
                    pre = len(prompt) / (time.perf_counter() - t0)
                del eng2
                prompts = [torch.randint(10, cfg.vocab_size, (1000,)).tolist() for _ in range(64)]
                for p_ in prompts:
                    eng.add_request(p_, SamplingParams(max_tokens=100, temperature=1.0, seed=1, ignore_eos=True))
                while any(s.num_computed < len(s.prompt_token_ids) for s in eng.seqs.values()):
                    eng.step()
                torch.cuda.synchronize()
                t0, n = time.perf_counter(), 0
                while eng.has_unfinished():
                    n += len(eng.step())
                torch.cuda.synchronize()
                r[f"price_{mode}"] = {"prefill_4k_tok_s": pre, "decode_b64_tok_s": n / (time.perf_counter() - t0)}
                del eng
            r["price_aligned_vs_default"] = {k: r["price_aligned"][k] / r["price_default"][k]
                                             for k in r["price_default"]}
        out[name] = r
        del m
        torch.cuda.empty_cache()
    return out


def main():
    if not torch.cuda.is_available():
        sys.exit("benchmarks/aligned.py needs a CUDA GPU")
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    sections = [("attention", check_attention), ("lightning", check_lightning), ("rows", check_rows),
                ("price", price), ("model", model_level), ("model-quick", lambda: model_level(quick=True))]
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else None
    for name, fn in sections:
        if only and name not in only:
            continue
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001  (report and go on: GPU time is scarce)
            traceback.print_exc()
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {json.dumps(out[name])}", flush=True)
    if isinstance(out.get("price"), dict) and "error" not in out["price"]:
        print(f"\n{out['card']}: aligned vs default (bf16)")
        for k, r in out["price"].items():
            print(f"{k:34s} default {r['default']:9.3f}  aligned {r['aligned']:9.3f}  x{r['aligned'] / r['default']:.2f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "aligned_ops.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
