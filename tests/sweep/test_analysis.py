"""The claims' verdicts on hand-built results: each rule can say yes, partly, no, and not tested."""
from ringlinear.sweep import analysis as A


def _run(ratio, size, budget, loss, flops=None, retrieval=None):
    b = float(budget)
    return {"spec": {"id": f"{ratio}-{size}-{budget}", "ratio": ratio, "size": size, "budget": budget,
                     "budget_flops": b, "flops": flops or b}, "val_loss": loss, "retrieval": retrieval}


BUDGETS = ["1e14", "1e15"]


def _front(losses):
    """losses: {ratio: [loss at 1e14, loss at 1e15]} -> frontier (the better of two sizes, the other +0.1)."""
    runs = [_run(r, s, b, l + d) for r, ls in losses.items() for b, l in zip(BUDGETS, ls)
            for s, d in (("5M", 0.0), ("20M", 0.1))]
    return A.frontier(runs), runs


def test_frontier_takes_the_best_size():
    front, _ = _front({"softmax": [3.0, 2.5]})
    assert front["softmax"]["1e14"]["val_loss"] == 3.0 and front["softmax"]["1e14"]["size"] == "5M"


def test_hybrid_beats_softmax():
    verdict = lambda losses: A.claim_hybrid_beats_softmax(_front(losses)[0])["verdict"]  # noqa: E731
    assert verdict({"softmax": [3.0, 2.5], "3": [2.9, 2.4], "7": [2.95, 2.45]}) == "reproduced"
    assert verdict({"softmax": [3.0, 2.5], "3": [2.9, 2.6]}) == "partly reproduced"
    assert verdict({"softmax": [3.0, 2.5], "3": [3.005, 2.6]}) == "not reproduced"  # a tie and a loss
    assert verdict({"3": [2.9, 2.4], "linear": [3.0, 2.6]}) == "not tested"


def test_larger_m_wins_later():
    def verdict(losses):
        front, runs = _front(losses)
        return A.claim_larger_m_wins_later(front, A.fits(runs), BUDGETS)
    c = verdict({"1": [2.90, 2.50], "7": [2.95, 2.40]})
    assert c["verdict"] == "reproduced" and "1e14 -> M=1, 1e15 -> M=7" in c["detail"]
    assert verdict({"1": [2.90, 2.40], "7": [2.95, 2.50]})["verdict"] == "not reproduced"
    assert verdict({"1": [2.90, 2.40]})["verdict"] == "not tested"


def _ret(mqar_in, mqar_long, pk_in, pk_long):
    return {"mqar": {"8": {"512": mqar_in, "1024": mqar_long}}, "passkey": {},
            "passkey_by_length": {"512": pk_in, "2048": pk_long}}


def test_retrieval_claim():
    def verdict(accs):
        runs = [_run(r, "5M", "1e15", 3.0, retrieval=_ret(*a)) for r, a in accs.items()]
        scores = A.retrieval_scores(runs, seq_len=512)
        return A.claim_retrieval(scores)
    c = verdict({"softmax": (0.9, 0.5, 0.9, 0.4), "3": (0.85, 0.5, 0.9, 0.5), "linear": (0.2, 0.0, 0.3, 0.0)})
    assert c["verdict"] == "reproduced" and "linear 25.0%" in c["detail"]
    # hybrids keep in-length retrieval but extrapolate no better than linear
    assert verdict({"3": (0.9, 0.0, 0.9, 0.0), "linear": (0.2, 0.0, 0.3, 0.0)})["verdict"] == "partly reproduced"
    assert verdict({"3": (0.2, 0.0, 0.3, 0.0), "linear": (0.2, 0.0, 0.3, 0.0)})["verdict"] == "not reproduced"
    assert verdict({"3": (0.01, 0.0, 0.0, 0.0), "linear": (0.0, 0.0, 0.0, 0.0)})["verdict"] == "inconclusive"
    assert verdict({"softmax": (0.9, 0.5, 0.9, 0.4), "3": (0.9, 0.5, 0.9, 0.4)})["verdict"] == "not tested"


def test_retrieval_scores_use_the_largest_budget_best_run():
    runs = [_run("3", "5M", "1e14", 2.0, retrieval=_ret(0.1, 0, 0, 0)),
            _run("3", "5M", "1e15", 2.9, retrieval=_ret(0.2, 0, 0, 0)),
            _run("3", "20M", "1e15", 2.8, retrieval=_ret(0.3, 0, 0, 0))]
    s = A.retrieval_scores(runs, seq_len=512)["3"]
    assert s["id"] == "3-20M-1e15" and s["mqar_in"] == 0.3 and s["mqar_long"] == 0.0


def test_one_size_frontier_is_flagged():
    front, _ = _front({"softmax": [3.0, 2.5], "3": [2.9, 2.4]})  # 5M best everywhere
    msg = A.one_size_frontier(front, ["5M", "20M"])
    assert msg is not None and "smallest size (5M)" in msg and "undertrained" in msg
    runs = [_run("softmax", "5M", "1e14", 3.0), _run("softmax", "20M", "1e14", 3.1),
            _run("softmax", "5M", "1e15", 2.6), _run("softmax", "20M", "1e15", 2.5)]  # the best size changes
    assert A.one_size_frontier(A.frontier(runs), ["5M", "20M"]) is None
    assert "largest size (20M)" in A.one_size_frontier(A.frontier(runs[1::2]), ["5M", "20M"])


def test_dry_run_notes_sizes_no_budget_can_train():
    from ringlinear.sweep.plan import undertrained
    spec = lambda size, steps, active: {"size": size, "steps": steps, "tokens_per_step": 1000, "active_params": active}
    specs = [spec("5M", 100_000, 5e6), spec("60M", 100, 6e7), spec("60M", 11_000, 6e7)]  # 20, 0.0017, 0.18 tok/param
    notes = undertrained(specs)
    assert len(notes) == 1 and "size 60M" in notes[0] and "0.18 tokens" in notes[0]
    assert undertrained([spec("60M", 132_000, 6e7)]) == []  # 2.2 tokens per parameter: above a tenth of 20
