"""What a sweep writes at the end: OUT/results.json, OUT/loss_vs_flops.png, OUT/retrieval.png, OUT/report.md."""
from __future__ import annotations

import datetime
import math
import os

from . import analysis as A
from .runs import write_json

_VERDICT_MARK = {"reproduced": "yes", "partly reproduced": "partly", "not reproduced": "no",
                 "inconclusive": "inconclusive", "not tested": "not tested"}


def build_results(settings: dict, data: dict, specs: list[dict], results: list[dict], failed: dict) -> dict:
    done = {r["id"] for r in results}
    front = A.frontier(results)
    fitted = A.fits(results)
    scores = A.retrieval_scores(results, settings["seq_len"])
    budgets = [b for b, _ in sorted({(s["budget"], s["budget_flops"]) for s in specs}, key=lambda x: x[1])]
    claims = [A.claim_hybrid_beats_softmax(front), A.claim_larger_m_wins_later(front, fitted, budgets),
              A.claim_retrieval(scores)]
    matching: dict = {}  # size -> ratio -> the shape every budget of that pair shares
    for s in specs:
        matching.setdefault(s["size"], {}).setdefault(s["ratio"], {
            k: s[k] for k in ("target", "active_params", "total_params", "layout", "moe_intermediate",
                              "dense_intermediate", "hidden", "layers", "heads", "head_dim", "kv_heads")})
    for size, by in matching.items():
        act = [v["active_params"] for v in by.values()]
        for v in by.values():
            v["deviation"] = v["active_params"] / v["target"] - 1
        by["_spread"] = max(act) / min(act) - 1
    runs = [{k: r[k] for k in ("id", "val_loss", "train_loss", "steps", "tokens", "seconds", "tokens_per_s",
                               "device", "retrieval")} | {k: r["spec"][k] for k in
                                                          ("ratio", "size", "budget", "budget_flops", "flops",
                                                           "flops_per_token", "active_params", "total_params")}
            for r in results]
    gpus = sorted({r.get("gpu") for r in results if r.get("gpu")})
    return {"date": datetime.date.today().isoformat(), "settings": settings, "data": data,
            "devices": gpus or sorted({r["device"] for r in results}), "param_matching": matching, "runs": runs,
            "missing": [s["id"] for s in specs if s["id"] not in done and s["id"] not in failed],
            "failed": failed, "skipped": settings.get("skipped", []), "frontier": front, "fits": fitted,
            "retrieval": scores, "claims": claims}


def write_all(out: str, res: dict) -> dict:
    write_json(os.path.join(out, "results.json"), res)
    paths = {"results": os.path.join(out, "results.json")}
    try:
        if res["runs"]:
            paths["loss_plot"] = plot_loss(res, os.path.join(out, "loss_vs_flops.png"))
            paths["retrieval_plot"] = plot_retrieval(res, os.path.join(out, "retrieval.png"))
    except ImportError:
        paths["plots"] = "matplotlib is not installed: no plots (pip install 'ringlinear[train]')"
    md = markdown(res)
    tmp = os.path.join(out, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, os.path.join(out, "report.md"))
    paths["report"] = os.path.join(out, "report.md")
    return paths


# ---------------------------------------------------------------------- plots
def _colors(labels):
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    n = max(len(labels) - 1, 1)
    return {r: cmap(0.9 * i / n) for i, r in enumerate(labels)}


def _save(fig, path):
    tmp = path + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp)
    os.replace(tmp, path)


def plot_loss(res: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = res["runs"]
    ratios = A.ordered(r["ratio"] for r in runs)
    sizes = [s for s in res["settings"]["sizes"] if any(r["size"] == s for r in runs)]
    col, marks = _colors(ratios), dict(zip(sizes, "osD^vP*X"))
    two = "softmax" in res["frontier"] and len(ratios) > 1
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(12 if two else 7, 4.6), dpi=120, squeeze=False)
    ax = axes[0][0]
    for ratio in ratios:
        pts = [r for r in runs if r["ratio"] == ratio]
        for r in pts:
            ax.scatter(r["flops"], r["val_loss"], color=col[ratio], marker=marks[r["size"]], s=28, zorder=3)
        f = res["fits"].get(ratio, {})
        label = f"M={ratio}" if ratio not in ("softmax", "linear") else ratio
        if "b" in f:
            lo, hi = min(r["flops"] for r in pts) / 1.3, max(r["flops"] for r in pts) * 1.3
            xs = [lo * (hi / lo) ** (i / 60) for i in range(61)]
            ax.plot(xs, [f["a"] * (x / f["c0"]) ** (-f["b"]) + f["e"] for x in xs], color=col[ratio], lw=1.4,
                    ls="--")
            label += f" (b={f['b']:.2f}±{f['b_err']:.2f})"
        ax.plot([], [], color=col[ratio], ls="--", marker="o", label=label)
    for s in sizes:
        ax.scatter([], [], color="gray", marker=marks[s], label=f"size {s}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss vs compute: runs and fits L = a (C/C0)^-b + e", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if two:
        ax = axes[0][1]
        sm = res["frontier"]["softmax"]
        for ratio in ratios:
            fr = res["frontier"][ratio]
            xs = [b for b in sm if b in fr]
            ax.plot([sm[b]["flops"] for b in xs], [fr[b]["val_loss"] - sm[b]["val_loss"] for b in xs], "o-",
                    color=col[ratio], label=ratio if ratio in ("softmax", "linear") else f"M={ratio}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("budget (training FLOPs)")
        ax.set_ylabel("best loss minus softmax's best loss")
        ax.set_title("best size per budget, relative to pure softmax (below 0 = better)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_retrieval(res: dict, path: str) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sc = res["retrieval"]
    if not sc:
        return None
    ratios = A.ordered(sc)
    col = _colors(ratios)
    T = res["settings"]["seq_len"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=120)
    for ratio in ratios:
        lab = ratio if ratio in ("softmax", "linear") else f"M={ratio}"
        mq = sc[ratio]["mqar"]
        kvs = sorted(mq, key=int)
        for ln, ls in zip(sorted({ln for c in mq.values() for ln in c}, key=int), ("-", "--", ":", "-.")):
            ks = [k for k in kvs if ln in mq[k]]
            a1.plot([int(k) for k in ks], [mq[k][ln] for k in ks], marker="o", ls=ls, color=col[ratio],
                    label=f"{lab}, {ln} tokens")
        pk = sc[ratio]["passkey_by_length"]
        lens = sorted(pk, key=int)
        a2.plot([int(x) for x in lens], [pk[x] for x in lens], "o-", color=col[ratio], label=lab)
    a1.set_xscale("log", base=2)
    a1.set_xlabel("key-value pairs")
    a1.set_ylabel("accuracy")
    a1.set_ylim(-0.03, 1.03)
    a1.set_title("MQAR (largest budget, best size per ratio)", fontsize=10)
    a1.legend(fontsize=6, ncol=2)
    a1.grid(alpha=0.3)
    a2.axvline(T, color="k", ls=":", lw=1)
    a2.text(T, 1.0, " training length", fontsize=7, va="top")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("document length (tokens)")
    a2.set_ylim(-0.03, 1.03)
    a2.set_title("passkey retrieval (mean over depths)", fontsize=10)
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- markdown
def _f(x, fmt="{:.3f}"):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _lab(r):
    return r if r in ("softmax", "linear") else f"M={r}"


def markdown(res: dict) -> str:
    st, data = res["settings"], res["data"]
    runs = res["runs"]
    ratios = A.ordered(st["ratios"])
    L = [f"# Hybrid-ratio sweep ({res['date']})", ""]
    n_done, n_all = len(runs), len(runs) + len(res["missing"]) + len(res["failed"])
    L += [f"{n_done} of {n_all} runs finished on {', '.join(res['devices']) or '–'}"
          + (f"; {len(res['missing'])} not run yet (run the same command again to continue)" if res["missing"]
             else "") + (f"; **{len(res['failed'])} failed**: {', '.join(res['failed'])}" if res["failed"] else "")
          + ".", ""]
    if res["skipped"]:
        L += [f"Left out (fewer than {st['min_steps']} steps at that budget): {', '.join(res['skipped'])}.", ""]
    corpus = "the embedded standard-library corpus" if data.get("default_corpus") else \
        f"{data.get('files')} files of {', '.join(st['data'])}"
    synth = data["synthetic_chars"] / max(1, data["synthetic_chars"] + data["natural_chars"])
    L += ["## Setup", "",
          f"- Data: {corpus}; {data['train_tokens'] / 1e6:.2f}M training tokens ({synth:.1%} of the characters "
          f"synthetic retrieval documents), {data['val_tokens'] / 1e3:.0f}k held-out; byte-level BPE of "
          f"{data['vocab']} tokens learnt once.",
          f"- Every run: rows of {st['seq_len']} tokens, {st['batch_size'] * st['grad_accum']} rows per step, AdamW "
          f"lr {st['lr']} (warmup {st['warmup_frac']:.0%} of the steps, cosine to {st['min_lr_ratio']}x), weight "
          f"decay {st['weight_decay']}, seed {st['seed']}; steps = budget / (FLOPs per token x tokens per step).",
          f"- FLOPs: 6 x active non-embedding matmul weights + 6 h V (LM head) + 3 x attention forward per token "
          f"(docs/sweep.md); softmax queries see {data['mean_keys']:.0f} keys on average on these rows.",
          f"- Loss: validation loss on the same {st['eval_rows']} held-out rows for every run.", ""]
    big = st["sizes"][-1]
    terms = ("matmul", "lm_head", "softmax_attention", "linear_attention")
    L += [f"FLOPs per token by term at size {big} (share of the total):", "",
          "| ratio | FLOPs/token | " + " | ".join(terms) + " |", "|---|---|" + "---|" * len(terms)]
    for ratio in ratios:
        r = next((x for x in runs if (x["ratio"], x["size"]) == (ratio, big)), None)
        if r:
            f = r["flops_per_token"]
            L.append(f"| {_lab(ratio)} | {f['total'] / 1e6:.1f}M | "
                     + " | ".join(f"{f[t] / f['total']:.0%}" for t in terms) + " |")
    L.append("")
    L += ["## Parameter matching (active non-embedding parameters)", "",
          "| size | ratio | layout | expert width | layer-0 MLP | active | vs target | total (all experts) |",
          "|---|---|---|---|---|---|---|---|"]
    for size, by in res["param_matching"].items():
        for ratio in ratios:
            v = by.get(ratio)
            if v:
                L.append(f"| {size} | {_lab(ratio)} | {v['layout']} | {v['moe_intermediate']} | "
                         f"{v['dense_intermediate']} | {v['active_params'] / 1e6:.3f}M | {v['deviation']:+.2%} | "
                         f"{v['total_params'] / 1e6:.2f}M |")
        v = next(iter(by.values()))
        L.append(f"| {size} | spread max/min−1: {by['_spread']:.2%} | width {v['hidden']}, {v['layers']} layers, "
                 f"{v['heads']}×{v['head_dim']} heads, {v['kv_heads']} KV | | | | | |")
    budgets = [b for b in st["budgets"]]
    L += ["", "## Validation loss per run (steps)", "",
          "| ratio | size | " + " | ".join(budgets) + " |", "|---|---|" + "---|" * len(budgets)]
    for ratio in ratios:
        for size in st["sizes"]:
            cells = []
            for b in budgets:
                r = next((x for x in runs if (x["ratio"], x["size"], x["budget"]) == (ratio, size, b)), None)
                cells.append(f"{r['val_loss']:.3f} ({r['steps']})" if r else "–")
            L.append(f"| {_lab(ratio)} | {size} | " + " | ".join(cells) + " |")
    L += ["", "## Best size per budget", "", "| ratio | " + " | ".join(budgets) + " |",
          "|---|" + "---|" * len(budgets)]
    for ratio in ratios:
        fr = res["frontier"].get(ratio, {})
        L.append(f"| {_lab(ratio)} | " + " | ".join(
            f"{fr[b]['val_loss']:.3f} ({fr[b]['size']})" if b in fr else "–" for b in budgets) + " |")
    warn = A.one_size_frontier(res["frontier"], st["sizes"])
    if warn:
        L += ["", warn]
    L += ["", "## Power-law fits L(C) = a (C/C0)^-b + e over all runs of a ratio", "",
          "| ratio | a | b | e | C0 | points | residual RMS |", "|---|---|---|---|---|---|---|"]
    for ratio in ratios:
        f = res["fits"].get(ratio, {})
        if "b" in f:
            L.append(f"| {_lab(ratio)} | {f['a']:.3f} ± {_f(f['a_err'])} | {f['b']:.3f} ± {_f(f['b_err'])} | "
                     f"{f['e']:.3f} ± {_f(f['e_err'])} | {f['c0']:.0e} | {f['n']} | {f['rms']:.4f} |")
        else:
            L.append(f"| {_lab(ratio)} | no fit: {f.get('error', 'no runs')} | | | | {f.get('n', 0)} | |")
    L += _retrieval_md(res)
    L += ["", "## The paper's claims", "", "| claim | reproduced? | evidence |", "|---|---|---|"]
    for c in res["claims"]:
        L.append(f"| {c['claim']} | **{_VERDICT_MARK[c['verdict']]}** | {c['detail']} |")
    toks = [r["tokens"] for r in runs] or [0]
    L += ["", "Scale caveat: these are models of " + ", ".join(st["sizes"]) + " active parameters trained on "
          f"{min(toks) / 1e6:.2g}M to {max(toks) / 1e6:.2g}M tokens each, one seed per run, with budgets far below "
          "those of the paper's billion-parameter models; differences under "
          f"{A.TIE} nats are called ties. A claim that does not reproduce here says little about the paper's "
          "scale, and one that does is a consistency check, not a confirmation.", "",
          "![loss vs FLOPs](loss_vs_flops.png)", ""]
    if res["retrieval"]:
        L += ["![retrieval](retrieval.png)", ""]
    return "\n".join(L)


def _retrieval_md(res: dict) -> list[str]:
    sc = res["retrieval"]
    if not sc:
        return ["", "## Retrieval", "", "No run with retrieval scores yet (they are measured at the largest budget)."]
    ratios = A.ordered(sc)
    first = sc[ratios[0]]
    cells = [(k, ln) for k, c in first["mqar"].items() for ln in c]
    T = res["settings"]["seq_len"]
    L = ["", f"## Retrieval (largest budget, best size per ratio; training rows are {T} tokens)", "",
         "MQAR accuracy by key-value pairs / document length:", "",
         "| ratio (run) | " + " | ".join(f"{k} kv / {ln}" for k, ln in cells) + " |", "|---|" + "---|" * len(cells)]
    for r in ratios:
        m = sc[r]["mqar"]
        L.append(f"| {_lab(r)} ({sc[r]['size']}) | " + " | ".join(
            _f(m.get(k, {}).get(ln), "{:.1%}") for k, ln in cells) + " |")
    lens = list(first["passkey_by_length"])
    L += ["", "Passkey accuracy by document length (mean over depths "
          + ", ".join(str(d) for d in res["settings"]["retrieval"]["depths"]) + "):", "",
          "| ratio | " + " | ".join(f"{ln}{' (>T)' if int(ln) > T else ''}" for ln in lens) + " |",
          "|---|" + "---|" * len(lens)]
    for r in ratios:
        p = sc[r]["passkey_by_length"]
        L.append(f"| {_lab(r)} | " + " | ".join(_f(p.get(ln), "{:.1%}") for ln in lens) + " |")
    return L
