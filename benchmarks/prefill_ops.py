"""What one engine prefill step costs on the host: aten ops, Triton launches and host syncs per layer type, and (on
CUDA) the step's wall time against the time the GPU is busy.

Short prompts are host-bound (issue 15): at 4K tokens the GPU idles for half of a Ring-mini prefill step while
Python dispatches ~hundreds of small kernels. This counts them where they come from, in ONE `LLMEngine.step()`
that prefills `--prompts` prompts of `--tokens` tokens (after one warm-up step of the same shape):

- aten ops (TorchDispatchMode; ops a Triton launch makes itself, e.g. under the CPU interpreter, are not counted),
- Triton launches (JITFunction.run / the interpreter's run),
- host syncs: `_local_scalar_dense` (.item(), int(t)), `nonzero`, and copies between host and device that are not
  `non_blocking` (torch synchronises the stream for those: `.cpu()`, `.tolist()`, `torch.tensor(.., device=cuda)`).
  On CPU there is no device, so the sync column counts `_local_scalar_dense`/`nonzero` only and `host_tensors`
  counts tensors made from Python data (`lift_fresh`: each one an H2D copy when the engine runs on CUDA),
- CUDA only: step wall time (median of --repeat, no counting mode) and the GPU-busy time of one profiled step (the
  union of its kernel intervals), and their ratio, the GPU-busy fraction.

Buckets: per decoder layer `<attn kind>+<mlp kind>` split into attention / mlp / norms, `model` (embedding, RoPE
tables, final norm), `engine` (everything outside the model: the attention context, logits, sampling). Per-layer
numbers are averages over the layers of that type.

Run (CPU, the CUDA kernel path under the Triton interpreter; softmax prefill there is the fp32 reference, which
the CUDA path replaces by one flash call):
  RINGLINEAR_BACKEND=triton TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/prefill_ops.py --preset mini-small \
      --batch-invariant 0 --lightning-segment 64
GPU (H200):  PYTHONPATH=. python benchmarks/prefill_ops.py --device cuda --preset ring-mini --tokens 4096
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ringlinear.engine.config import EngineConfig
from ringlinear.engine.engine import LLMEngine
from ringlinear.engine.sampling_params import SamplingParams
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.models.presets import get_preset

# name -> config. mini-small keeps Ring-mini's layer pattern (dense layer 0, 4 linear : 1 softmax), GQA ratio and
# router (top-8 of 8 groups, 4 kept) at a size the Triton interpreter runs in seconds (64 experts, not 256: the
# op and launch counts do not depend on the expert count).
SHAPES = {
    "tiny": lambda: get_preset("tiny"),
    "mini-small": lambda: get_preset("ring-mini-linear-2.0").replace(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=10, num_attention_heads=4,
        num_experts=64,
        num_key_value_heads=1, head_dim=32, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
        max_position_embeddings=8192, eos_token_id=[1], pad_token_id=1),
    "ring-mini": lambda: get_preset("ring-mini-linear-2.0"),
}
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2"}
# ops that launch no device kernel: allocation, metadata, host scalars (views are recognised by their schema)
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "promote_types", "lift_fresh",
             "detach", "alias", "_local_scalar_dense", "result_type", "is_same_size", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset"}


class Counter(TorchDispatchMode):
    """Counts aten ops, Triton launches and host syncs under the bucket on top of `self.where`."""

    def __init__(self):
        super().__init__()
        self.where = ["engine"]
        self.ops = collections.Counter()      # (bucket, op name) -> calls
        self.kernels = collections.Counter()  # (bucket, op name) -> calls that run a kernel (no view/alloc)
        self.syncs = collections.Counter()    # (bucket, op name) -> calls that wait for the device
        self.fresh = collections.Counter()    # bucket -> tensors made from Python data
        self.in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.in_kernel:
            where, name = self.where[-1], func.overloadpacket.__name__
            self.ops[(where, name)] += 1
            if not (func.is_view or name in NO_KERNEL):
                self.kernels[(where, name)] += 1
            if name in SYNC_OPS and _on_device(args):
                self.syncs[(where, name)] += 1
            elif name in ("_to_copy", "copy_") and _crosses_host(func, args, kwargs):
                self.syncs[(where, name + "(h<->d)")] += 1
            elif name == "lift_fresh":
                self.fresh[where] += 1
        return func(*args, **kwargs)

    def count_triton(self):
        """Wrap Triton's launch entry points (compiled and interpreted) so each launch is counted once."""
        import triton.runtime.jit as jit
        targets = [jit.JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction
            targets.append(InterpretedFunction)
        except ImportError:
            pass
        for cls in targets:
            if getattr(cls.run, "_counted", False):
                continue
            orig = cls.run

            def run(fn_self, *a, _orig=orig, **k):
                self.ops[(self.where[-1], "triton:" + fn_self.fn.__name__)] += 1
                self.in_kernel += 1
                try:
                    return _orig(fn_self, *a, **k)
                finally:
                    self.in_kernel -= 1
            run._counted = True
            cls.run = run


def _on_device(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)


def _crosses_host(func, args, kwargs) -> bool:
    """A blocking copy between host and device (torch synchronises the stream for those)."""
    if kwargs.get("non_blocking", False) or (len(args) > 2 and args[2] is True and func.__name__.startswith("copy_")):
        return False
    src = args[1] if func.overloadpacket.__name__ == "copy_" else args[0]
    dst_dev = args[0].device if func.overloadpacket.__name__ == "copy_" else (kwargs.get("device") or src.device)
    return torch.device(dst_dev).type != src.device.type


def tag_modules(model, counter: Counter) -> dict[str, int]:
    """Push a bucket name on entry to each decoder layer's parts; returns layers per layer type."""
    kinds = collections.Counter()

    def push(name):
        return lambda m, inp: counter.where.append(name)

    def pop(m, inp, out):
        counter.where.pop()

    inner = model.model
    inner.register_forward_pre_hook(push("model"))
    inner.register_forward_hook(pop)
    for layer in inner.layers:
        kind = ("softmax" if layer.is_softmax else "linear") + "+" + \
            ("moe" if hasattr(layer.mlp, "gate") else "dense")
        kinds[kind] += 1
        for part, mod in (("attention", layer.attention), ("mlp", layer.mlp), ("norms", layer.input_layernorm),
                          ("norms", layer.post_attention_layernorm)):
            mod.register_forward_pre_hook(push(f"{kind}/{part}"))
            mod.register_forward_hook(pop)
    return dict(kinds)


def build(args):
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = SHAPES[args.preset]()
    model = RingLinearForCausalLM.from_config(cfg, dtype=dtype, device=dev, seed=0).eval()
    per_seq = args.tokens + 8
    blocks = 2 * args.prompts * (-(-per_seq // 16) + 1) + 1
    tokens = args.prompts * args.tokens
    chunk = -(-max(args.tokens, 64) // 64) * 64
    ecfg = EngineConfig(max_num_seqs=args.prompts, max_num_batched_tokens=max(tokens, chunk), prefill_chunk=chunk,
                        block_size=16, num_kv_blocks=blocks, max_model_len=per_seq + 64, cuda_graphs=False,
                        numerics=args.numerics, batch_invariant=args.batch_invariant,
                        enable_prefix_caching=False)
    return model, LLMEngine(model=model, config=ecfg)


def add_prompts(eng, args, seed):
    g = torch.Generator().manual_seed(seed)
    vocab = eng.model_config.vocab_size
    for _ in range(args.prompts):
        ids = torch.randint(3, vocab, (args.tokens,), generator=g).tolist()
        eng.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))


def prefill_step(eng, args, seed, counter=None):
    """Add the prompts and run the one step that prefills them all (and samples their first token); only the step
    itself runs under `counter`."""
    add_prompts(eng, args, seed)
    with counter if counter is not None else contextlib.nullcontext():
        eng.step()
    if eng.has_unfinished():
        raise RuntimeError("the prompts did not fit one step; raise the budget")


def gpu_busy_s(eng, args) -> float:
    """GPU-busy seconds of one profiled step: the union of its kernel intervals."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill_step(eng, args, seed=99)
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy, end = busy + (e - s), e
        elif e > end:
            busy, end = busy + (e - end), e
    return busy / 1e6  # us -> s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="mini-small", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default=None, help="bfloat16 / float32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per prompt")
    ap.add_argument("--prompts", type=int, default=2, help="prompts prefilled in the one step")
    ap.add_argument("--numerics", default="default", choices=("default", "aligned"))
    ap.add_argument("--batch-invariant", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                    help="engine batch_invariant (default: the engine's: on for CPU, off for CUDA)")
    ap.add_argument("--lightning-segment", type=int, default=None,
                    help="force the Triton lightning prefill to split sequences into segments of this many tokens "
                         "(what an H200 picks for one short prompt; the interpreter's 4 'SMs' rarely split)")
    ap.add_argument("--detail", action="store_true", help="list the kernel ops of every bucket")
    ap.add_argument("--repeat", type=int, default=5, help="timed steps (CUDA)")
    args = ap.parse_args()
    if args.tokens < 1 or args.prompts < 1:
        ap.error("--tokens and --prompts must be >= 1")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")

    if args.lightning_segment:
        from ringlinear.ops.lightning_attn import triton as lightning_triton
        lightning_triton.TUNE["segment"] = args.lightning_segment
    model, eng = build(args)
    prefill_step(eng, args, seed=0)  # warm-up: compiles and tunes the kernels for these shapes
    counter = Counter()
    kinds = tag_modules(model, counter)
    try:
        counter.count_triton()
    except ImportError:
        pass
    prefill_step(eng, args, seed=1, counter=counter)

    buckets = collections.defaultdict(lambda: collections.Counter())
    for (where, name), n in counter.ops.items():
        col = "triton" if name.startswith("triton:") else "aten"
        buckets[where][col] += n
    for (where, _), n in counter.kernels.items():
        buckets[where]["kernels"] += n
    for (where, _), n in counter.syncs.items():
        buckets[where]["syncs"] += n
    for where, n in counter.fresh.items():
        buckets[where]["host_tensors"] += n

    rows = {}  # row name -> counts per step
    per_layer = {}
    for kind, nl in kinds.items():
        tot = collections.Counter()
        for part in ("attention", "mlp", "norms"):
            c = buckets.pop(f"{kind}/{part}", collections.Counter())
            rows[f"{kind}/{part}"] = dict(c)
            tot.update(c)
        per_layer[kind] = {k: round(v / nl, 1) for k, v in tot.items()}
    for where in sorted(buckets):
        rows[where] = dict(buckets[where])
    total = collections.Counter()
    for c in rows.values():
        total.update(c)

    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# one prefill step: {args.prompts} x {args.tokens} tokens, {args.preset} {args.dtype}, "
          f"numerics={args.numerics}, backend={os.environ.get('RINGLINEAR_BACKEND', 'auto')}, {card}")
    cols = ("aten", "kernels", "triton", "syncs", "host_tensors")
    print(f"{'bucket (per step)':<28}" + "".join(f"{c:>13}" for c in cols))
    for name, c in [*rows.items(), ("total", total)]:
        print(f"{name:<28}" + "".join(f"{c.get(k, 0):>13}" for k in cols))
    print("per layer (average)")
    for kind, c in per_layer.items():
        print(f"  {kind + f' x{kinds[kind]}':<26}" + "".join(f"{c.get(k, 0):>13}" for k in cols))
    top = collections.Counter()
    for (where, name), n in counter.kernels.items():
        top[name] += n
    print("kernel ops:", ", ".join(f"{k} {v}" for k, v in top.most_common(14)))
    if args.detail:
        for where in sorted({w for w, _ in counter.kernels}):
            ops = collections.Counter({n: c for (w, n), c in counter.kernels.items() if w == where})
            print(f"  {where}: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    print("syncs:", dict(collections.Counter({f"{w}:{n}": c for (w, n), c in counter.syncs.items()})) or "none")

    res = dict(card=card, preset=args.preset, dtype=args.dtype, tokens=args.tokens, prompts=args.prompts,
               numerics=args.numerics, backend=os.environ.get("RINGLINEAR_BACKEND", "auto"), layers=kinds,
               lightning_segment=args.lightning_segment,
               per_layer=per_layer, buckets=rows, total=dict(total))
    if cuda:
        walls = []
        for r in range(args.repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prefill_step(eng, args, seed=10 + r)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        busy = gpu_busy_s(eng, args)
        res.update(step_wall_ms=round(wall * 1e3, 3), gpu_busy_ms=round(busy * 1e3, 3),
                   gpu_busy_fraction=round(busy / wall, 3),
                   tok_per_s=round(args.prompts * args.tokens / wall, 1))
        print(f"step wall {wall * 1e3:.2f} ms (median of {args.repeat}), GPU busy {busy * 1e3:.2f} ms "
              f"(one profiled step): busy fraction {busy / wall:.2f}; {res['tok_per_s']:.0f} tok/s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
