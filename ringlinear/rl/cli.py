"""`ringlinear rl`: the flags are generated from `RLConfig` (dash-case); every check runs before a model loads."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ..train.cli import add_dataclass_flags
from .config import RUN_DEFINING, RLConfig, dump

_EPILOG = """examples:
  ringlinear rl --model runs/sft/final --task arithmetic --out runs/rl --steps 100
  ringlinear rl --model M --task code --group-size 8 --numerics aligned --out runs/rl-code
  ringlinear rl --model M --task jsonl --data prompts.jsonl --reward my_rewards:score --out runs/rl-mine
  ringlinear rl --out runs/rl --resume auto          # continue exactly where the last checkpoint stopped
  torchrun --nproc-per-node 2 -m ringlinear rl --model M --task arithmetic --out runs/rl-ddp

The objective, the numerics modes and every metric: docs/rl.md.
"""


def register(sub) -> None:
    r = sub.add_parser("rl", help="RL (GRPO / PPO-clip) on verifiable tasks, rollouts from the engine on the "
                                  "policy's own weights",
                       description="GRPO advantages with the PPO-clip objective whose old policy is the rollout "
                                   "engine's own log-probs (paper Eq. 5; --old-logprobs recompute for Eq. 6), "
                                   "truncated IS / ratio masking, KL to the initial policy, exact resume.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(r, RLConfig)
    r.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    r.set_defaults(func=cmd_rl)

    a = sub.add_parser("align-check", help="rollout-engine log-probs vs the training forward's: the four mismatch "
                                           "figures and, if any, the first layer and op that diverge",
                       description="Samples prompts of mixed lengths through the engine at temperature 1 (batched), "
                                   "recomputes their log-probs with the training forward (sequence_logprobs) and "
                                   "prints max/mean |dlogp|, KL(rollout||train) and the share of tokens with "
                                   "|p_train - p_rollout| > 0.8; a final JSON line has the same keys.")
    a.add_argument("--model", required=True, help="checkpoint directory")
    a.add_argument("--numerics", choices=["default", "aligned"], default="aligned")
    a.add_argument("--prompts", type=int, default=16, help="number of prompts (lengths spread over 1..--max-prompt)")
    a.add_argument("--max-tokens", type=int, default=48, help="tokens sampled per prompt")
    a.add_argument("--max-prompt", type=int, default=300, help="longest prompt (tokens)")
    a.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    a.add_argument("--dtype", default="auto", help="auto (config torch_dtype), bfloat16, float32")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=cmd_align_check)


def resolve_config(args) -> RLConfig:
    """Defaults, then flags; with --resume the saved run's configuration, then the flags given now."""
    names = {f.name for f in dataclasses.fields(RLConfig)}
    explicit = {k: v for k, v in vars(args).items() if k in names}
    cfg = RLConfig().replace(**explicit)
    if cfg.resume:
        from ..train.checkpoint import MANIFEST, find_resume
        path = find_resume(cfg.out, cfg.resume)
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                saved = json.load(f).get("config") or {}
        except (OSError, ValueError):
            saved = {}  # the trainer's verification names what is wrong with this checkpoint
        changed = [k for k in RUN_DEFINING if k in explicit and k in saved and explicit[k] != saved[k]]
        if changed:
            raise ValueError(f"--resume continues the saved run; {', '.join('--' + k.replace('_', '-') for k in changed)}"
                             " cannot change (start a new run with another --out)")
        keep = {k: v for k, v in saved.items() if k in names and k != "resume"}
        cfg = RLConfig.from_dict(keep).replace(**explicit) if keep else cfg
    return cfg.validate()


def cmd_rl(args) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        print(dump(cfg))
        return 0
    from . import train
    train(cfg)
    return 0


def cmd_align_check(args) -> int:
    for name in ("prompts", "max_tokens", "max_prompt"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"model directory {args.model} does not exist")
    import torch

    from ..models.modeling import RingLinearForCausalLM
    from .align_check import align_check
    from .metrics import MISMATCH_KEYS
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = RingLinearForCausalLM.from_pretrained(args.model, dtype=args.dtype, device=device)
    res = align_check(model, args.numerics, args.prompts, args.max_tokens, args.max_prompt, args.seed)
    print(f"align-check ({args.numerics} numerics, {res['tokens']} tokens, {device}, "
          f"{next(model.parameters()).dtype}):")
    for k in MISMATCH_KEYS:
        print(f"  {k:18s} {res[k]:.3e}")
    d = res["divergence"]
    print("  first divergence  " + ("none: every log-prob equal bit for bit" if d is None else
                                   f"layer {d['layer']} ({d['layer_type']}) {d['op']}, position {d['first_position']}, "
                                   f"max |diff| {d['max_abs_diff']:.3e}"))
    print(json.dumps({k: res[k] for k in (*MISMATCH_KEYS, "tokens", "numerics", "divergence")}))
    return 0
