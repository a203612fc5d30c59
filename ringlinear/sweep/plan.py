"""The plan of a sweep: every run's spec (model, steps, FLOPs, recipe) and its TrainConfig."""
from __future__ import annotations

import os


def plan(s: dict, ratios, sizes, budgets, vocab: int, mean_keys: float | None) -> tuple[list[dict], list[str]]:
    """Every run's spec (path-free: OUT may move), and the ids left out for too few steps."""
    from .flops import flops_per_token
    from .grid import match_size
    tokens_per_step = s["seq_len"] * s["batch_size"] * s["grad_accum"]
    padded = max(-(-vocab // 64) * 64, 64)
    specs, skipped = [], []
    for size, target in sizes:
        # non-embedding counts do not depend on the vocabulary: match once, then size the embeddings
        shape, matched = match_size(target, ratios, 64, max(4096, 8 * s["seq_len"]), s["depth"] or None)
        for m in matched:
            cfg = m.config.replace(vocab_size=padded)
            fpt = flops_per_token(cfg, s["seq_len"], mean_keys)
            for b, c in budgets:
                rid = f"{m.ratio.label if m.ratio.kind != 'hybrid' else 'm' + m.ratio.label}-{size}-{b}"
                steps = int(round(c / (fpt.total * tokens_per_step)))
                if steps < s["min_steps"]:
                    skipped.append(rid)
                    continue
                specs.append({
                    "id": rid, "ratio": m.ratio.label, "size": size, "target": target, "budget": b,
                    "budget_flops": c, "steps": steps, "tokens_per_step": tokens_per_step,
                    "flops_per_token": fpt.per_token, "flops": fpt.total * steps * tokens_per_step,
                    "layout": m.layout, "active_params": m.active, "total_params": m.total,
                    "moe_intermediate": cfg.moe_intermediate_size, "dense_intermediate": cfg.intermediate_size,
                    "hidden": shape.hidden, "layers": shape.layers, "heads": shape.heads, "head_dim": shape.head_dim,
                    "kv_heads": shape.kv_heads, "retrieval": c == budgets[-1][1], "model": cfg.to_dict(),
                    "train": _train_fields(s, steps)})
    order = {r.label: i for i, r in enumerate(ratios)}
    specs.sort(key=lambda x: (x["budget_flops"], x["target"], order[x["ratio"]]))
    return specs, skipped


def _train_fields(s: dict, steps: int) -> dict:
    return {"preset": "sweep", "vocab_size": s["vocab_size"], "bpe_sample_mb": s["bpe_sample_mb"],
            "seq_len": s["seq_len"], "batch_size": s["batch_size"], "grad_accum": s["grad_accum"], "steps": steps,
            "lr": s["lr"], "min_lr_ratio": s["min_lr_ratio"], "schedule": "cosine",
            "warmup_steps": max(1, round(s["warmup_frac"] * steps)), "weight_decay": s["weight_decay"],
            "seed": s["seed"], "val_fraction": s["val_fraction"], "eval_every": 0, "eval_rows": s["eval_rows"],
            "save_every": max(1, steps // 2), "keep_last": 1, "progress": False, "plot": False,
            # small models are launch-bound on a GPU: one host read per 10 steps lets the CPU run ahead
            "log_every": 10}


def train_config(out: str, spec: dict):
    """The run's TrainConfig: the spec's recipe plus this sweep directory's paths."""
    from ..train.config import TrainConfig
    run_dir = os.path.join(out, "runs", spec["id"])
    return TrainConfig(**spec["train"], data=[os.path.join(out, "corpus", "corpus.jsonl")], out=run_dir,
                       data_cache=os.path.join(out, "data"), model_config=os.path.join(run_dir, "model_config.json"),
                       tokenizer=os.path.join(out, "tokenizer"))


def print_plan(specs: list[dict], skipped: list[str]) -> None:
    print(f"{'run':28s} {'layout':22s} {'active':>9s} {'total':>9s} {'I':>5s} {'F':>5s} {'steps':>6s} "
          f"{'tokens':>8s} {'FLOPs':>9s}")
    for x in specs:
        print(f"{x['id']:28s} {x['layout']:22s} {x['active_params'] / 1e6:8.3f}M {x['total_params'] / 1e6:8.2f}M "
              f"{x['moe_intermediate']:5d} {x['dense_intermediate']:5d} {x['steps']:6d} "
              f"{x['steps'] * x['tokens_per_step'] / 1e6:7.2f}M {x['flops']:9.3g}")
    tot = sum(x["flops"] for x in specs)
    print(f"{len(specs)} runs, {tot:.3g} FLOPs in all (at 100 TFLOP/s achieved: {tot / 1e14 / 60:.1f} min)"
          + (f"; left out (< min steps): {', '.join(skipped)}" if skipped else ""))
    for note in undertrained(specs):
        print(note)


COMPUTE_OPTIMAL_TOKENS_PER_PARAM = 20  # Chinchilla's rule of thumb (Hoffmann et al. 2022)


def undertrained(specs: list[dict]) -> list[str]:
    """A note per size whose largest budget gives it under a tenth of the compute-optimal ~20 tokens per active
    parameter: such a size cannot be the best one at any budget of the grid, so it adds no point to the frontier."""
    notes = []
    for size in dict.fromkeys(x["size"] for x in specs):
        runs = [x for x in specs if x["size"] == size]
        best = max(x["steps"] * x["tokens_per_step"] / x["active_params"] for x in runs)
        if best < COMPUTE_OPTIMAL_TOKENS_PER_PARAM / 10:
            notes.append(f"note: size {size} sees at most {best:.2g} tokens per active parameter (compute-optimal is "
                         f"about {COMPUTE_OPTIMAL_TOKENS_PER_PARAM}): it will be undertrained at every budget; "
                         "raise --budgets or drop the size")
    return notes
