"""Optimizer groups, LR schedules, MoE balancing (bias update, sequence aux loss, imbalance)."""
import pytest
import torch

from ringlinear.models.presets import get_preset
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.train.balance import MoEBalancer, seq_aux_loss
from ringlinear.train.optim import lr_factor, param_groups


def test_no_decay_on_norms_embeddings_biases():
    m = RingLinearForCausalLM.from_config(get_preset("tiny").replace(use_qkv_bias=True), dtype=torch.float32)
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "model.word_embeddings.weight" in nd and "model.norm.weight" in nd
    assert all("norm" in n or n.endswith("bias") or "embeddings" in n for n in nd)
    assert {"lm_head.weight", "model.layers.1.mlp.gate.weight", "model.layers.0.attention.g_proj.weight",
            "model.layers.1.mlp.w13", "model.layers.1.mlp.w2"} <= d
    assert "model.layers.0.attention.query_key_value.bias" in nd
    assert len(d) + len(nd) == len(list(m.parameters())) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0


def test_schedules():
    f = lambda s, sched: lr_factor(s, 100, 10, sched, 0.1, 0.2)  # noqa: E731
    assert [f(s, "cosine") for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup
    assert f(10, "cosine") == pytest.approx(1.0) and f(55, "cosine") == pytest.approx(0.55)
    assert f(99, "cosine") == pytest.approx(0.1, abs=1e-3) and f(150, "cosine") == pytest.approx(0.1)
    assert [f(s, "wsd") for s in (10, 50, 79)] == [1.0, 1.0, 1.0]  # stable until the last 20%
    assert f(89, "wsd") == pytest.approx(0.55) and f(99, "wsd") == pytest.approx(0.1)
    assert f(50, "constant") == 1.0
    c = [f(s, "cosine") for s in range(10, 100)]
    assert all(a >= b for a, b in zip(c, c[1:]))


def test_seq_aux_loss_values():
    T, E, k = 64, 8, 2
    # perfectly balanced routing and uniform scores: f_e = 1, P_e = 1/E -> sum_e f_e P_e = 1 per row
    idx = torch.arange(T * k).remainder(E).view(T, k)
    logits = torch.zeros(T, E, requires_grad=True)
    rows = torch.zeros(T, dtype=torch.long)
    assert float(seq_aux_loss(logits, idx, rows, 1).detach()) == pytest.approx(1.0)
    # all tokens on experts 0 and 1, which also score highest: f = 4 for both, P = s(3) / (2 s(3) + 6 s(0))
    idx2 = torch.tensor([[0, 1]] * T)
    lg = torch.zeros(T, E)
    lg[:, :2] = 3.0
    lg.requires_grad_(True)
    val = seq_aux_loss(lg, idx2, rows, 1)
    s3 = torch.sigmoid(torch.tensor(3.0))
    assert float(val.detach()) == pytest.approx(float(8 * s3 / (2 * s3 + 3)))
    val.backward()
    assert lg.grad[:, :2].sum() > 0  # pushes the favoured experts' scores down
    two = seq_aux_loss(logits, idx, torch.arange(T) // 32, 2)  # two rows, each balanced
    assert float(two.detach()) == pytest.approx(2.0)


def test_bias_update_moves_toward_balance():
    m = RingLinearForCausalLM.from_config(get_preset("tiny"), dtype=torch.float32, seed=0)
    bal = MoEBalancer(m, rate=0.01, aux_coef=0.0)
    assert len(bal.blocks) == 4 and all(b.record_stats for b in bal.blocks)
    x = torch.randint(0, 256, (1, 128))
    m(x, cu_seqlens=torch.tensor([0, 128], dtype=torch.int32))
    counts = [torch.bincount(b.last_topk_idx.reshape(-1), minlength=8) for b in bal.blocks]
    assert bal.after_forward(torch.zeros(128, dtype=torch.long), 1) is None
    stats = bal.step()
    for b, c in zip(bal.blocks, counts):
        mean = c.double().mean()
        want = 0.01 * torch.sign(mean - c.double()).float()
        assert torch.equal(b.gate.expert_bias, want)  # overloaded experts down, idle ones up, by exactly `rate`
    ratios = [float(c.max() / c.double().mean()) for c in counts]
    stats = {k: float(v) for k, v in stats.items()}  # device scalars (read when the loop logs)
    assert stats["moe_imbalance"] == pytest.approx(sum(ratios) / 4) and stats["moe_imbalance_max"] == max(ratios)
    assert bal.counts is None  # reset for the next step


def test_grad_checkpointing_gives_the_same_training(tmp_path, tiny_cfg):
    """Recomputing each layer in the backward changes memory, not results (CPU: bitwise), aux loss included."""
    from ringlinear.train import train
    from ringlinear.train.report import read_metrics
    runs = {}
    for gc in (False, True):
        out = tmp_path / f"gc{int(gc)}"
        train(tiny_cfg(out, steps=3, eval_every=0, save_every=0, grad_checkpointing=gc, seq_aux_loss_coef=1e-2))
        runs[gc] = [(r["loss"], r["grad_norm"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert runs[True] == runs[False]
