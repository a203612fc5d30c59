"""`ringlinear generate`, `ringlinear info`, `ringlinear demo`."""
from __future__ import annotations

import os
import sys
import time


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a checkpoint directory (streams to stdout)")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text prompt")
    src.add_argument("--chat", help="a user message, wrapped in the checkpoint's chat template")
    g.add_argument("--system", default=None, help="system message for --chat")
    # Sampling flags left out take ringlinear.sampling.Sampling's defaults (the model's own distribution).
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default 0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 1.0 = off)")
    g.add_argument("--min-p", type=float, default=None,
                   help="keep tokens with probability >= MIN_P x the largest (default 0 = off)")
    g.add_argument("--presence-penalty", type=float, default=None, help="OpenAI's, in [-2, 2] (default 0)")
    g.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI's, in [-2, 2] (default 0)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF/vLLM multiplicative rule over prompt + output, in (0, 10] (default 1 = off)")
    g.add_argument("--logit-bias", action="append", default=None, metavar="TOKEN_ID=BIAS",
                   help="add BIAS in [-100, 100] to a token's logit (repeatable)")
    g.add_argument("--seed", type=int, default=0, help="default 0: the same output every run")
    g.add_argument("--dtype", default="auto", help="auto (config torch_dtype), bfloat16, float16, float32")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--quantization", choices=("fp8", "none"), default=None,
                   help="fp8: blockwise e4m3 weights (docs/serving.md); default: as the checkpoint is stored")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="config summary, parameter counts, layer pattern, state/KV memory")
    i.add_argument("--model", help="checkpoint directory (or use --preset)")
    i.add_argument("--preset", help="a named preset instead of a directory")
    i.add_argument("--context", type=int, default=131072, help="context length for the memory figures")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="build a small random-weight checkpoint and generate from it")
    d.add_argument("--out", default="runs/demo-random")
    d.set_defaults(func=cmd_demo)


def cmd_generate(args) -> int:
    import torch

    from .generation import generate
    from .models.checkpoint import resolve_device, resolve_dtype
    from .models.config import RingLinearConfig
    from .models.fp8_serve import check_fp8_dims, check_fp8_runtime, checkpoint_quantization
    from .models.modeling import RingLinearForCausalLM
    from .models.tokenizer import StreamDecoder, load_tokenizer
    from .sampling import Sampling
    # Every flag is checked before the model loads (and before the prompt is echoed).
    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
             "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
             "repetition_penalty": args.repetition_penalty, "logit_bias": _logit_bias(args.logit_bias)}
    sampling = Sampling(max_tokens=args.max_new_tokens, seed=args.seed,
                        **{k: v for k, v in given.items() if v is not None})
    device = resolve_device(args.device)
    if args.dtype != "auto":
        resolve_dtype(args.dtype)
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"model directory {args.model} does not exist")
    cfg = RingLinearConfig.from_json(args.model)
    if (args.quantization or checkpoint_quantization(cfg)) == "fp8":
        check_fp8_dims(cfg)
        check_fp8_runtime(device)
    tok = load_tokenizer(args.model)
    model = RingLinearForCausalLM.from_pretrained(args.model, dtype=args.dtype, device=device,
                                                  quantization=args.quantization)
    if args.chat is not None:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        msgs.append({"role": "user", "content": args.chat})
        text = tok.apply_chat_template(msgs, add_generation_prompt=True)
    else:
        text = args.prompt
    ids = tok.encode(text)
    if not ids:
        raise ValueError("the prompt encodes to zero tokens")
    stream = StreamDecoder(tok)
    if args.prompt is not None:
        sys.stdout.write(text)
    sys.stdout.flush()
    t0 = time.perf_counter()

    def on_token(row, t):
        sys.stdout.write(stream.push(t))
        sys.stdout.flush()

    out = generate(model, torch.tensor([ids]), sampling=sampling, stop_token_ids=tok.stop_token_ids or None,
                   streamer=on_token)
    sys.stdout.write(stream.flush() + "\n")
    n = len(out.sequences[0])
    dt = time.perf_counter() - t0
    print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s, finish: {out.finish_reasons[0]}]", file=sys.stderr)
    return 0


def _logit_bias(items: list[str] | None) -> dict[str, float] | None:
    """--logit-bias TOKEN_ID=BIAS, repeated -> {id: bias}; the ranges are Sampling's checks."""
    if not items:
        return None
    out = {}
    for item in items:
        tok, sep, bias = item.partition("=")
        try:
            out[tok.strip()] = float(bias)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS, e.g. 42=-100")
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_info(args) -> int:
    from .models.config import RingLinearConfig
    from .models.presets import get_preset
    from .models.modeling import count_parameters, kv_bytes_per_token, state_bytes_per_sequence
    if bool(args.model) == bool(args.preset):
        raise ValueError("give exactly one of --model DIR or --preset NAME")
    if args.context < 1:
        raise ValueError(f"--context must be >= 1, got {args.context}")
    cfg = RingLinearConfig.from_json(args.model) if args.model else get_preset(args.preset)
    c = count_parameters(cfg)
    pattern = "".join("S" if t == "softmax" else "L" for t in cfg.layer_types)
    n_lin, n_sm = len(cfg.linear_layers), len(cfg.softmax_layers)
    st = state_bytes_per_sequence(cfg)
    kv = kv_bytes_per_token(cfg)
    lines = [
        f"model_type            {cfg.model_type} ({', '.join(cfg.architectures)})",
        f"hidden / layers       {cfg.hidden_size} / {cfg.num_hidden_layers}",
        f"heads / kv / head_dim {cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.head_dim_}",
        f"layer pattern         {pattern}  (L linear x{n_lin}, S softmax x{n_sm}; softmax at {cfg.softmax_layers})",
        f"ffn                   dense x{cfg.first_k_dense_replace} ({cfg.intermediate_size}), MoE {cfg.num_experts}"
        f" experts of {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}, {cfg.num_shared_experts} shared,"
        f" groups {cfg.n_group}/{cfg.topk_group}, scale {cfg.routed_scaling_factor}",
        f"vocab / max positions {cfg.vocab_size} / {cfg.max_position_embeddings}"
        f"  rope theta {cfg.rope_theta:g}, rotary dim {cfg.rotary_dim}, scaling {cfg.rope_scaling}",
        f"decay formula         {cfg.decay_layer_formula}",
        f"parameters total      {c['total'] / 1e9:.3f} B  (non-embedding {c['total_non_embedding'] / 1e9:.3f} B)",
        f"parameters active     {c['active'] / 1e9:.3f} B  (non-embedding {c['active_non_embedding'] / 1e6:.1f} M)",
        f"linear state / seq    {_fmt_bytes(st)} fp32 (constant)",
        f"softmax KV / token    {_fmt_bytes(kv)} bf16",
        f"memory / seq @ {args.context:<7d}{_fmt_bytes(st + kv * args.context)}"
        f"  (an all-softmax twin: {_fmt_bytes(kv * args.context * cfg.num_hidden_layers / max(1, n_sm))})",
    ]
    print("\n".join(lines))
    return 0


def cmd_demo(args) -> int:
    from .models.demo import make_tiny_checkpoint
    out = os.path.abspath(args.out)
    make_tiny_checkpoint(out, preset="small", seed=0)
    print(f"wrote a random-weight 'small' checkpoint to {out}")
    from .cli import main
    main(["info", "--model", out, "--context", "32768"])
    return main(["generate", "--model", out, "--prompt", "def fib(n):", "--max-new-tokens", "24", "--seed", "0"])
