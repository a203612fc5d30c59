"""FP8 weight serving (`quantization="fp8"`, models/fp8_serve.py): logit error, speed, and Ring-flash on one GPU.

1. error: logits of the FP8 model vs the bf16 model it was quantised from (same random weights), relative RMS and
   top-1 agreement, on the `tiny-fp8` preset and on a Ring-mini-shaped slice (the first layers, random weights);
   bf16 vs fp32 beside it, for scale.
2. speed: a Ring-mini slice, bf16 vs FP8 through the serving engine: prefill (one 4K request) and decode (batch 32
   at 16K context; the cache filled with random values instead of a prefill, as benchmarks/long_context.py does).
3. Ring-flash-linear-2.0, full shape, FP8 on one GPU: built on the meta device, allocated in FP8, each weight drawn
   in bf16 on the GPU an expert chunk at a time and quantised at once (the bf16 model never exists); memory, then
   decode at batch 32 / 16K context against its bandwidth floor: (active weight bytes, every expert touched by a
   token counted once, + KV read + linear states read and written) / 4.8 TB/s (the H200's nominal bandwidth), and
   / the measured copy bandwidth.

Random weights: the error numbers describe random-init networks (nearly flat logits: top-1 agreement is a hard
test there), not a trained checkpoint's. Prints a table and a final JSON line.
Run: PYTHONPATH=. python benchmarks/fp8_serve.py [--quick] [--device cpu]   (cpu: toy sizes, the exact emulation)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from long_context import bench_decode, bench_prefill, copy_bandwidth, random_model  # noqa: E402

from ringlinear.models import fp8_serve as S  # noqa: E402
from ringlinear.models.context import StatelessContext  # noqa: E402
from ringlinear.models.modeling import kv_bytes_per_token, state_bytes_per_sequence  # noqa: E402
from ringlinear.models.presets import get_preset  # noqa: E402

GiB = 1 << 30
H200_BW = 4.8e12


def mini_slice(layers):
    """Ring-mini-linear-2.0's shape, first `layers` layers (one dense, the rest MoE; the last one softmax)."""
    return get_preset("ring-mini-linear-2.0").replace(num_hidden_layers=layers, layer_group_size=layers)


@torch.no_grad()
def logits_of(model, ids):
    dev = next(model.parameters()).device
    return model.compute_logits(model.forward_packed(ids.to(dev), StatelessContext(
        torch.tensor([0, ids.numel()], dtype=torch.int32, device=dev)))).float()


def compare(a, b):
    return {"rel_rms": ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item(),
            "top1_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}


def error_section(cfg, dev, T, seed=0):
    """fp8 vs bf16 and bf16 vs fp32 logits of one random model on T tokens."""
    bf = random_model(cfg, dev, seed)
    ids = torch.randint(10, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(seed))
    l_bf = logits_of(bf, ids)
    l_32 = logits_of(bf.float(), ids)   # the same weights in fp32 (.float() on the bf16 values)
    bf.to(torch.bfloat16)
    S.quantize_fp8_(bf)                 # in place, module by module: no second model
    out = {"fp8_vs_bf16": compare(logits_of(bf, ids), l_bf), "bf16_vs_fp32": compare(l_bf, l_32),
           "fp8_vs_fp32": compare(logits_of(bf, ids), l_32), "tokens": T}
    del bf
    return out


def bytes_gib(model):
    return {k: v / GiB for k, v in S.weight_bytes(model).items()}


def speed_section(cfg, dev, prefill_T, B, C, steps, bw):
    res = {}
    for name in ("bf16", "fp8"):
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        m = random_model(cfg, dev)
        if name == "fp8":
            S.quantize_fp8_(m)
        tps, dt, peak = bench_prefill(m, prefill_T, chunk=-(-prefill_T // 64) * 64)
        dec = bench_decode(m, B, C, steps, bw)
        res[name] = {"weights_gib": bytes_gib(m)["total"], "prefill_tok_s": tps, "prefill_s": dt,
                     "prefill_peak_gib": peak, "decode": dec}
        print(f"  {name}: weights {res[name]['weights_gib']:.2f} GiB, prefill {prefill_T}: {tps:,.0f} tok/s, "
              f"decode B={B} C={C}: {dec['tok_s']:,.0f} tok/s ({dec['step_ms']:.2f} ms/step, "
              f"{dec['pct_of_floor']:.0f}% of the copy-bandwidth floor)", flush=True)
        del m
    return res


@torch.no_grad()
def flash_fp8(cfg, dev, B, C, steps, bw):
    """The full Ring-flash shape in FP8: meta -> FP8 buffers -> allocated -> random weights quantised chunk-wise."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    m = random_model(cfg, dev, fp8=True)
    build_s = time.perf_counter() - t0
    wb = bytes_gib(m)
    alloc = torch.cuda.memory_allocated(dev) / GiB if dev.type == "cuda" else float("nan")
    build_peak = torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else float("nan")
    bf16_gib = (wb["total"] + wb["fp8_codes"] - wb["fp8_scales"])   # the same tensors with 2-byte weights
    print(f"  built in {build_s:.1f} s: weights {wb['total']:.1f} GiB (FP8 codes {wb['fp8_codes']:.1f}, scales "
          f"{wb['fp8_scales']:.2f}, bf16 rest {wb['other']:.1f}; in bf16 it would be {bf16_gib:.1f} GiB), "
          f"allocated {alloc:.1f} GiB, build peak {build_peak:.1f} GiB", flush=True)
    dec = bench_decode(m, B, C, steps, bw)
    floor_bytes = dec["floor_ms"] / 1e3 * bw
    dec["floor_ms_4p8TBps"] = floor_bytes / H200_BW * 1e3
    dec["pct_of_4p8TBps_floor"] = 100 * dec["floor_ms_4p8TBps"] / dec["step_ms"]
    kv_state = B * (C * kv_bytes_per_token(cfg) + state_bytes_per_sequence(cfg)) / GiB
    print(f"  decode B={B} C={C}: {dec['tok_s']:,.0f} tok/s, {dec['step_ms']:.2f} ms/step; floor "
          f"{dec['floor_ms_4p8TBps']:.2f} ms at 4.8 TB/s ({dec['pct_of_4p8TBps_floor']:.0f}%), {dec['floor_ms']:.2f} "
          f"ms at the measured copy bandwidth ({dec['pct_of_floor']:.0f}%); KV + states {kv_state:.1f} GiB, "
          f"peak {dec['peak_gib']:.1f} GiB", flush=True)
    del m
    return {"build_s": build_s, "weights_gib": wb, "bf16_equivalent_gib": bf16_gib, "allocated_gib": alloc,
            "build_peak_gib": build_peak, "kv_state_gib": kv_state, "decode": dec}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a small smoke run (fewer layers, shorter contexts)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-flash", action="store_true", help="leave out section 3")
    args = ap.parse_args()
    dev = torch.device(args.device)
    toy = dev.type == "cpu"
    if toy:  # the exact emulation, toy sizes: checks the script, not the card
        os.environ.setdefault("RINGLINEAR_FP8_EMULATE", "1")
        torch.set_num_threads(1)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    bw = copy_bandwidth(dev) if dev.type == "cuda" else H200_BW
    res = {"card": card, "copy_bw_TBps": bw / 1e12, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    print(f"{card}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)

    mini = get_preset("tiny-fp8") if toy else mini_slice(3 if args.quick else 5)
    print("1. logit error", flush=True)
    res["error"] = {"tiny-fp8": error_section(get_preset("tiny-fp8"), dev, 64 if toy else 512),
                    "mini_slice": error_section(mini, dev, 64 if toy else 1024)}
    res["error"]["mini_slice"]["layers"] = mini.num_hidden_layers
    for k, v in res["error"].items():
        f8 = v["fp8_vs_bf16"]
        print(f"  {k}: fp8 vs bf16 rel RMS {f8['rel_rms']:.4f}, top-1 {f8['top1_agree']:.3f}"
              f"; bf16 vs fp32 {v['bf16_vs_fp32']['rel_rms']:.4f} / {v['bf16_vs_fp32']['top1_agree']:.3f}", flush=True)

    T, B, C, steps = (128, 4, 256, 6) if toy else ((4096, 32, 4096, 12) if args.quick else (4096, 32, 16384, 24))
    print(f"2. speed, {'tiny-fp8' if toy else f'Ring-mini slice ({mini.num_hidden_layers} layers)'}", flush=True)
    res["speed"] = speed_section(mini, dev, T, B, C, steps, bw)
    res["speed"]["layers"] = mini.num_hidden_layers
    if not args.skip_flash:
        flash = get_preset("tiny-fp8") if toy else get_preset("ring-flash-linear-2.0")
        if args.quick and not toy:
            flash = flash.replace(num_hidden_layers=8)
        print(f"3. {'tiny-fp8' if toy else 'Ring-flash-linear-2.0'} in FP8 ({flash.num_hidden_layers} layers)",
              flush=True)
        res["flash_fp8"] = flash_fp8(flash, dev, B, C, steps, bw)
        res["flash_fp8"]["layers"] = flash.num_hidden_layers

    s = res["speed"]
    print(f"\n{'':<34}{'bf16':>12}{'fp8':>12}{'fp8/bf16':>10}")
    rows = [("weights GiB", s["bf16"]["weights_gib"], s["fp8"]["weights_gib"]),
            (f"prefill tok/s (T={T})", s["bf16"]["prefill_tok_s"], s["fp8"]["prefill_tok_s"]),
            (f"decode tok/s (B={B}, C={C})", s["bf16"]["decode"]["tok_s"], s["fp8"]["decode"]["tok_s"]),
            ("decode % of copy-bw floor", s["bf16"]["decode"]["pct_of_floor"], s["fp8"]["decode"]["pct_of_floor"])]
    for name, a, b in rows:
        print(f"{name:<34}{a:>12.2f}{b:>12.2f}{b / a:>10.2f}")
    for k, v in res["error"].items():
        print(f"{'error ' + k:<34}fp8 vs bf16 rel RMS {v['fp8_vs_bf16']['rel_rms']:.4f}, top-1 "
              f"{v['fp8_vs_bf16']['top1_agree']:.3f}")
    if "flash_fp8" in res:
        f = res["flash_fp8"]
        print(f"{'flash FP8 weights / bf16 equiv.':<34}{f['weights_gib']['total']:.1f} / {f['bf16_equivalent_gib']:.1f}"
              f" GiB; decode {f['decode']['tok_s']:,.0f} tok/s = {f['decode']['pct_of_4p8TBps_floor']:.0f}% of the "
              "4.8 TB/s floor")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
