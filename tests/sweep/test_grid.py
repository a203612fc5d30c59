"""Grid parsing, layouts, and parameter matching across ratios (active non-embedding count within 2%)."""
import math

import pytest
import torch

from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.sweep.grid import (MATCH_TOLERANCE, Ratio, match_size, parse_budgets, parse_ratios, parse_sizes)


def _active_by_hand(cfg) -> int:
    """Every parameter of the real module tree, less embeddings, LM head and the routed experts a token skips."""
    with torch.device("meta"):
        m = RingLinearForCausalLM(cfg)
    n = sum(p.numel() for p in m.parameters()) - m.model.word_embeddings.weight.numel() - m.lm_head.weight.numel()
    for layer in m.model.layers:
        if hasattr(layer.mlp, "w13"):  # the stacked experts: [E, 2I, h] and [E, h, I]
            per_expert = (layer.mlp.w13.numel() + layer.mlp.w2.numel()) // cfg.num_experts
            n -= (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    return n


@pytest.mark.parametrize("ratios,size", [("softmax,3", "0.2M"), ("softmax,1,3,7,linear", "5M"),
                                         ("softmax,1,3,4,7,15,linear", "20M")])
def test_ratios_are_parameter_matched(ratios, size):
    (label, target), = parse_sizes(size)
    rs = parse_ratios(ratios)
    shape, matched = match_size(target, rs, 4096, 8192)
    counts = [_active_by_hand(m.config) for m in matched]
    assert counts == [m.active for m in matched]  # the solver's count is the module tree's
    for m, n in zip(matched, counts):
        assert abs(n / target - 1) <= MATCH_TOLERANCE, (m.ratio.label, n)
        c = m.config
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (shape.hidden, shape.layers,
                                                                              shape.heads)
        assert c.head_dim in (16, 32, 64, 128, 256) and c.moe_intermediate_size % 32 == 0
        assert c.intermediate_size % 16 == 0 and c.intermediate_size >= 32
    assert max(counts) / min(counts) - 1 <= MATCH_TOLERANCE
    # totals differ (the experts absorb the attention difference) and count every expert
    assert all(m.total > m.active for m in matched)


def test_layouts():
    L = 16
    n_sm = {r.label: len(r.softmax_layers(L)) for r in parse_ratios("softmax,1,3,4,7,15,linear")}
    assert n_sm == {"softmax": 16, "1": 8, "3": 4, "4": 3, "7": 2, "15": 1, "linear": 0}
    assert Ratio("3", 3.0).softmax_layers(8) == [3, 7]  # groups of 4: the released code's rule
    assert Ratio("4", 4.0).softmax_layers(16) == [4, 10, 15]  # 16 is no multiple of 5: spread evenly
    shape, matched = match_size(5e6, parse_ratios("softmax,4,linear"), 4096, 8192)
    by = {m.ratio.label: m.config for m in matched}
    assert shape.layers == 10  # 8 by size, raised to a multiple of the group of 5
    assert by["4"].softmax_layer_indices is None and by["4"].layer_group_size == 5  # the HF predicate suffices
    assert [i for i in range(10) if by["4"].is_softmax_layer(i)] == [4, 9]
    assert by["linear"].softmax_layer_indices == [] and by["softmax"].layer_group_size == 1
    _, matched = match_size(5e6, parse_ratios("3,4"), 4096, 8192, depth=16)
    assert matched[1].config.softmax_layer_indices == [4, 10, 15]  # the predicate would add a softmax tail


def test_depth_follows_the_largest_group():
    shape, matched = match_size(20e6, parse_ratios("softmax,15"), 4096, 8192)
    assert shape.layers == 16 and [i for i in range(16) if matched[1].config.is_softmax_layer(i)] == [15]
    with pytest.raises(ValueError, match="ratio 15 needs at least 16 layers"):
        match_size(20e6, parse_ratios("15"), 4096, 8192, depth=8)
    with pytest.raises(ValueError, match="same layout"):
        match_size(5e6, parse_ratios("3,4"), 4096, 8192, depth=8)  # both 6 linear + 2 softmax on 8 layers


@pytest.mark.parametrize("fn,text,msg", [
    (parse_ratios, "softmax,0", "not 'softmax', 'linear' or a positive integer"),
    (parse_ratios, "3,3", "repeats"), (parse_ratios, "", "empty"),
    (parse_sizes, "5X", "not a parameter count"), (parse_sizes, "1K", "below the smallest"),
    (parse_budgets, "lots", "not a FLOP count"), (parse_budgets, "-1e15", "positive"),
    (parse_budgets, "inf", "positive")])
def test_parse_errors(fn, text, msg):
    with pytest.raises(ValueError, match=msg):
        fn(text)


def test_parse_values():
    assert parse_sizes("20M,250k,1.5M") == [("250K", 2.5e5), ("1.5M", 1.5e6), ("20M", 2e7)]
    assert parse_budgets("3e14,1e15") == [("3e14", 3e14), ("1e15", 1e15)]
    assert [r.label for r in parse_ratios("linear,7,softmax,1")] == ["softmax", "1", "7", "linear"]
    assert math.isinf(parse_ratios("linear")[0].m)
