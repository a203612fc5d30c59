"""`ringlinear train` and `ringlinear convert`. The train flags are generated from `TrainConfig` (dash-case)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from .config import RUN_DEFINING, TrainConfig, describe_presets, dump, get_train_preset

_EPILOG = """presets:
{presets}

examples:
  ringlinear train                                   # the default: tiny-code on this Python's stdlib sources
  ringlinear train --data 'corpus/**/*.jsonl' --out runs/mine --steps 2000
  ringlinear train --out runs/mine --resume auto     # continue exactly where the last checkpoint stopped
  torchrun --nproc-per-node 2 -m ringlinear train --out runs/ddp   # data parallel (gloo on CPU, nccl on CUDA)
  ringlinear convert --from-softmax ling-ckpt --layer-group-size 5 --out hybrid
  ringlinear train --preset continue --init-from hybrid --data data/ --out runs/continue
"""


def register(sub) -> None:
    t = sub.add_parser("train", help="train or continue a hybrid model (default: a tiny code model, minutes on CPU)",
                       description="Train a Ring-linear hybrid: packing with document boundaries, AdamW + "
                                   "warmup/cosine|WSD, aux-loss-free MoE balancing, exact resume, DDP via torchrun. "
                                   "Defaults shown are those of the tiny-code preset.",
                       epilog=_EPILOG.format(presets=describe_presets()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(t, TrainConfig)
    t.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("convert", help="turn an all-softmax GQA checkpoint into a hybrid (paper §4)",
                       description="Layers that become linear get their QKV expanded GQA -> MHA (KV heads repeated) "
                                   "and a fresh g_proj and g_norm; the other layers keep their weights.")
    c.add_argument("--from-softmax", required=True, metavar="DIR",
                   help="source checkpoint: every layer softmax (layer_group_size 1), or a Ling-2.0 style config")
    c.add_argument("--layer-group-size", required=True, type=int, metavar="G",
                   help="layers per group in the result: G-1 linear then 1 softmax (5 = Ring-mini's 4:1)")
    c.add_argument("--out", required=True, metavar="DIR2", help="output checkpoint directory (written atomically)")
    c.add_argument("--group-norm-size", type=int, default=None,
                   help="groups of the new output norm (default: the source config's, else 4)")
    c.add_argument("--seed", type=int, default=0, help="seed of the fresh g_proj weights")
    c.set_defaults(func=cmd_convert)


def add_dataclass_flags(parser, cls) -> None:
    """One flag per field of the config dataclass `cls` (`seq_len` -> `--seq-len`, help from the field's metadata,
    booleans `--x/--no-x`). Flags not given stay absent from the parsed args, so a preset or saved config fills them."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        flag = "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta.pop("help") + _default(f)}
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif "nargs" in meta:
            kw.update(nargs=meta["nargs"], type=meta.get("type", str), metavar="PATH")
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[str(f.type)]
            if "choices" in meta:
                kw["choices"] = meta["choices"]
        parser.add_argument(flag, **kw)


def _default(f) -> str:
    d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(d, bool) or d in ("", [], 0, 0.0):
        return ""
    return f" (default: {d})"


def resolve_config(args) -> TrainConfig:
    """Preset, then flags; with --resume the saved run's configuration, then the flags given now."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    explicit = {k: v for k, v in vars(args).items() if k in names}
    cfg = get_train_preset(explicit.get("preset", "tiny-code")).replace(**explicit)
    if cfg.resume:
        from .checkpoint import find_resume
        saved = _saved_config(find_resume(cfg.out, cfg.resume))
        if saved is not None:
            changed = [k for k in RUN_DEFINING if k in explicit and explicit[k] != saved.get(k)]
            if changed:
                raise ValueError(f"--resume continues the saved run; {', '.join('--' + k.replace('_', '-') for k in changed)}"
                                 " cannot change (start a new run with another --out)")
            # --resume and --stop-at belong to one invocation, not to the run
            keep = {k: v for k, v in saved.items() if k in names and k not in ("resume", "stop_at")}
            cfg = TrainConfig.from_dict(keep).replace(**explicit)
            if "out" not in explicit and cfg.resume != "auto":
                cfg = cfg.replace(out=saved.get("out", cfg.out))
    return cfg.validate()


def _saved_config(path: str):
    from .checkpoint import MANIFEST
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f).get("config")
    except (OSError, ValueError):
        return None  # the trainer's verification reports what is wrong with this checkpoint


def cmd_train(args) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        print(dump(cfg))
        return 0
    from . import train
    train(cfg)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_softmax_to_hybrid
    out = convert_softmax_to_hybrid(args.from_softmax, args.layer_group_size, args.out,
                                    group_norm_size=args.group_norm_size, seed=args.seed)
    print(f"wrote {out['out']}: {out['linear']} linear + {out['softmax']} softmax layers "
          f"({out['expanded']} QKV expanded GQA->MHA, fresh g_proj/g_norm)")
    return 0
