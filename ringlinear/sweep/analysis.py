"""From finished runs to findings: the compute frontier, per-ratio power-law fits, retrieval scores, and the paper's
three claims, each judged by a rule written here (docs/sweep.md) and worded from the numbers.

Ratios order by M (linear layers per softmax layer): softmax (M = 0) < 1 < 3 < ... < linear (M = inf).
"""
from __future__ import annotations

import math

from .fit import fit_power_law

TIE = 0.01        # nats: loss differences below this are called ties (one seed per run)
ACC_MARGIN = 0.05  # accuracy differences below this are called equal
LEARNED = 0.10     # below this best accuracy, nobody learned the task: the retrieval claim is inconclusive


def ratio_m(label: str) -> float:
    return 0.0 if label == "softmax" else math.inf if label == "linear" else float(label)


def ordered(labels) -> list[str]:
    return sorted(set(labels), key=ratio_m)


def frontier(results: list[dict]) -> dict:
    """ratio -> budget label -> the run with the lowest validation loss at that budget (over sizes)."""
    out: dict = {}
    for r in results:
        s = r["spec"]
        cur = out.setdefault(s["ratio"], {}).get(s["budget"])
        if cur is None or r["val_loss"] < cur["val_loss"]:
            out[s["ratio"]][s["budget"]] = {"val_loss": r["val_loss"], "size": s["size"], "id": s["id"],
                                            "flops": s["flops"]}
    return out


def one_size_frontier(front: dict, sizes: list[str]) -> str | None:
    """A warning when one size is the best at every budget of every ratio: the envelope then has a single size, the
    budgets sit on one side of the other sizes' compute-optimal points, and the fits describe off-optimal runs."""
    best = {run["size"] for per in front.values() for run in per.values()}
    if len(best) != 1 or len(sizes) < 2:
        return None
    (size,) = best
    where = "smallest" if size == sizes[0] else "largest" if size == sizes[-1] else "same"
    side = {"smallest": "below the compute-optimal budgets of the larger sizes (they are undertrained: larger "
                        "budgets or smaller sizes would trace the frontier)",
            "largest": "above the compute-optimal budgets of the smaller sizes (smaller budgets or larger sizes "
                       "would trace the frontier)",
            "same": "around the compute-optimal budget of that one size"}[where]
    return (f"The {where + ' ' if where != 'same' else ''}size ({size}) is the best at every budget for every "
            f"ratio: the budgets lie {side}. The comparison per budget still holds (same compute for every ratio), "
            "but the envelope is one size and the fitted curves mix it with off-optimal runs.")


def fits(results: list[dict]) -> dict:
    """ratio -> fitted power law over all its runs (every size and budget), or {"error": why}."""
    out = {}
    for ratio in ordered(r["spec"]["ratio"] for r in results):
        pts = [(r["spec"]["flops"], r["val_loss"]) for r in results if r["spec"]["ratio"] == ratio]
        try:
            out[ratio] = fit_power_law([c for c, _ in pts], [y for _, y in pts]).to_dict()
        except ValueError as e:
            out[ratio] = {"error": str(e), "n": len(pts)}
    return out


def retrieval_scores(results: list[dict], seq_len: int) -> dict:
    """ratio -> the retrieval of its best run at the largest budget that has one, with summary scores:
    mqar_in / passkey_in (lengths <= seq_len), mqar_long / passkey_long (longer: extrapolation)."""
    by_ratio: dict = {}
    for r in results:
        if r.get("retrieval") is None:
            continue
        s = r["spec"]
        cur = by_ratio.get(s["ratio"])
        key = (s["budget_flops"], -r["val_loss"])
        if cur is None or key > cur[0]:
            by_ratio[s["ratio"]] = (key, r)
    out = {}
    for ratio, (_, r) in by_ratio.items():
        t = r["retrieval"]
        mq = [(int(ln), a) for cells in t["mqar"].values() for ln, a in cells.items()]
        pk = [(int(ln), a) for ln, a in t["passkey_by_length"].items()]
        out[ratio] = {"id": r["spec"]["id"], "size": r["spec"]["size"], "budget": r["spec"]["budget"], **t,
                      "mqar_in": _mean(a for ln, a in mq if ln <= seq_len),
                      "mqar_long": _mean(a for ln, a in mq if ln > seq_len),
                      "passkey_in": _mean(a for ln, a in pk if ln <= seq_len),
                      "passkey_long": _mean(a for ln, a in pk if ln > seq_len)}
    return out


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _claim(name, verdict, detail):
    return {"claim": name, "verdict": verdict, "detail": detail}


def claim_hybrid_beats_softmax(front: dict) -> dict:
    name = "Hybrids beat pure softmax at every budget"
    hybrids = [r for r in ordered(front) if 0 < ratio_m(r) < math.inf]
    if "softmax" not in front or not hybrids:
        return _claim(name, "not tested", "needs the softmax ratio and at least one hybrid ratio")
    wins = ties = losses = 0
    parts = []
    for h in hybrids:
        for b, sm in front["softmax"].items():
            if b not in front[h]:
                continue
            d = sm["val_loss"] - front[h][b]["val_loss"]
            wins, ties, losses = wins + (d > TIE), ties + (abs(d) <= TIE), losses + (d < -TIE)
            parts.append(f"M={h} at {b}: {d:+.3f}")
    n = wins + ties + losses
    if n == 0:
        return _claim(name, "not tested", "no budget has both a softmax and a hybrid run")
    verdict = "reproduced" if wins == n else "partly reproduced" if wins else "not reproduced"
    return _claim(name, verdict, f"a hybrid is lower than softmax by more than {TIE} nats in {wins} of {n} (ratio, "
                                 f"budget) pairs ({ties} ties, {losses} higher); softmax minus hybrid, best size per "
                                 f"budget: " + ", ".join(parts))


def claim_larger_m_wins_later(front: dict, fitted: dict, budgets: list[str]) -> dict:
    name = "Larger M wins at larger budgets"
    hybrids = [r for r in ordered(front) if 0 < ratio_m(r) < math.inf]
    have = [b for b in budgets if sum(b in front[h] for h in hybrids) >= 2]
    if len(hybrids) < 2 or len(have) < 2:
        return _claim(name, "not tested", "needs two hybrid ratios at two budgets or more")
    best = []
    for b in have:
        ranked = sorted((front[h][b]["val_loss"], h) for h in hybrids if b in front[h])
        tie = len(ranked) > 1 and ranked[1][0] - ranked[0][0] <= TIE
        best.append((b, ranked[0][1], tie))
    ms = [ratio_m(h) for _, h, _ in best]
    mono = all(x <= y for x, y in zip(ms, ms[1:]))
    if ms[-1] > ms[0]:
        verdict = "reproduced" if mono else "partly reproduced"
    else:
        verdict = "not reproduced"
    exps = [f"M={h}: b={fitted[h]['b']:.3f}±{fitted[h]['b_err']:.3f}" for h in hybrids if "b" in fitted.get(h, {})]
    detail = "best hybrid per budget: " + ", ".join(f"{b} -> M={h}{' (tie)' if t else ''}" for b, h, t in best)
    if exps:
        detail += "; fitted exponents " + ", ".join(exps)
    return _claim(name, verdict, detail)


def claim_retrieval(scores: dict) -> dict:
    name = "Hybrids keep the retrieval and extrapolation that pure linear loses"
    hybrids = [r for r in ordered(scores) if 0 < ratio_m(r) < math.inf]
    if "linear" not in scores or not hybrids:
        return _claim(name, "not tested", "needs the linear ratio and at least one hybrid ratio with retrieval scores")
    best = max((v or 0) for s in scores.values() for k, v in s.items()
               if k in ("mqar_in", "mqar_long", "passkey_in", "passkey_long"))
    if best < LEARNED:
        return _claim(name, "inconclusive", f"no model reached {LEARNED:.0%} accuracy on any retrieval cell "
                                            f"(best {best:.1%}): too little training at this scale")
    held, words = 0, []
    for what, keys in (("retrieval", ("mqar_in", "passkey_in")), ("extrapolation", ("mqar_long", "passkey_long"))):
        def sc(r):
            v = [scores[r][k] for k in keys if scores[r][k] is not None]
            return sum(v) / len(v) if v else None
        lin, hyb = sc("linear"), [sc(h) for h in hybrids]
        sm = sc("softmax") if "softmax" in scores else None
        if lin is None or None in hyb:
            words.append(f"{what}: not measured")
            continue
        loses = lin < min(hyb) - ACC_MARGIN
        keeps = sm is None or min(hyb) >= sm - ACC_MARGIN
        held += loses and keeps
        words.append(f"{what} (mean of {' and '.join(keys)}): linear {lin:.1%}, hybrids "
                     + ", ".join(f"M={h} {v:.1%}" for h, v in zip(hybrids, hyb))
                     + (f", softmax {sm:.1%}" if sm is not None else "")
                     + f" -> linear {'loses' if loses else 'does not lose'} it, hybrids "
                     + ("keep it" if keeps else "fall short of softmax"))
    verdict = "reproduced" if held == 2 else "partly reproduced" if held else "not reproduced"
    return _claim(name, verdict, "; ".join(words))
