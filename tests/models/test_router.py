"""Router: grouped top-k equals brute-force enumeration; ties go to the lowest index; weights use unbiased scores."""
import itertools

import pytest
import torch

from ringlinear.ops.moe.reference import route


def brute_force(x, w, bias, k, n_group, topk_group):
    """Enumerate every admissible expert set: groups chosen by the sum of their top-2 biased scores, then the best
    k-subset inside the chosen groups by total biased score."""
    E = w.shape[0]
    per = E // n_group
    scores = torch.sigmoid(x.double() @ w.double().T)
    sel = scores + bias.double()
    out = []
    for t in range(x.shape[0]):
        s = sel[t]
        gscore = [sorted(s[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_group)]
        gscore = [a + b for a, b in gscore]
        best_groups = max(itertools.combinations(range(n_group), topk_group),
                          key=lambda c: sum(gscore[g] for g in c))
        allowed = [e for g in best_groups for e in range(g * per, (g + 1) * per)]
        best = max(itertools.combinations(allowed, k), key=lambda c: sum(s[e].item() for e in c))
        out.append(set(best))
    return out, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_topk_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    E, h, k, n_group, topk_group = 16, 12, 3, 4, 2
    x = torch.randn(40, h, generator=g)
    w = torch.randn(E, h, generator=g)
    bias = torch.randn(E, generator=g) * 0.3
    idx, wt, logits = route(x, w, bias, k, n_group, topk_group, 2.5, True)
    expected, scores = brute_force(x, w, bias, k, n_group, topk_group)
    for t in range(x.shape[0]):
        assert set(idx[t].tolist()) == expected[t]
        p = scores[t, idx[t]]
        assert torch.allclose(wt[t].double(), p / p.sum() * 2.5, rtol=1e-6)  # unbiased scores, normalised, scaled
    assert logits.dtype == torch.float32 and wt.dtype == torch.float32


def test_bias_changes_selection_not_weights():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    bias = torch.zeros(8)
    bias[5] = 10.0  # forces expert 5 into every selection
    idx, wt, _ = route(x, w, bias, 2, 1, 1, 1.0, True)
    assert (idx == 5).any(1).all()
    scores = torch.sigmoid(x @ w.T)
    assert torch.allclose(wt, torch.gather(scores, 1, idx) / torch.gather(scores, 1, idx).sum(1, keepdim=True))


def test_ties_lowest_index():
    # Identical router rows make every score equal: the lowest groups, then the lowest experts, must win.
    x = torch.randn(5, 4)
    w = torch.randn(1, 4).expand(16, 4).contiguous()
    idx, wt, _ = route(x, w, torch.zeros(16), 3, 4, 2, 2.5, True)
    assert idx.tolist() == [[0, 1, 2]] * 5
    # Two experts tied for the last slot: 9 == 13 (same weights); 9 must be chosen.
    w2 = torch.randn(16, 4)
    w2[13] = w2[9]
    b = torch.full((16,), -5.0)
    b[[2, 9, 13]] = 0.0
    b[2] = 5.0
    idx, _, _ = route(torch.randn(3, 4), w2, b, 2, 1, 1, 1.0, True)
    assert idx.tolist() == [[2, 9]] * 3
