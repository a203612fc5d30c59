"""Data parallel over two real gloo processes equals one process on the combined batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.train.config import TrainConfig
from ringlinear.train.dist import all_reduce_sum
from ringlinear.train.step import to_host
from ringlinear.train.trainer import Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_step(tr: Trainer) -> dict:
    """Gradients of step 0 (after DDP's all-reduce), the loss, and the expert biases after the balancing update."""
    st = to_host(tr.forward_backward(0))
    st = {**st, "loss": st["loss_sum"] / st["targets"], "aux_loss": st["aux_sum"] / st["rows"],
          "target_tokens": st["targets"]}
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    moe = to_host(tr.balancer.step(lambda t: all_reduce_sum(tr.env, t)))
    bias = {n: b.clone() for n, b in tr.model.named_buffers() if n.endswith("expert_bias")}
    tr.opt.zero_grad(set_to_none=True)
    return {"grads": grads, "loss": st["loss"], "aux": st["aux_loss"], "tokens": st["target_tokens"], "moe": moe,
            "bias": bias}


def _init(rank, world, port):
    """One process group for the worker's lifetime: the Trainers join it (and leave it to us to destroy)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _worker(rank, world, port, cfg_dict, result_dir):
    _init(rank, world, port)
    cfg = TrainConfig.from_dict(cfg_dict)
    tr = Trainer(cfg)
    assert tr.ddp is not None and tr.env.world == world
    torch.save(_first_step(tr), os.path.join(result_dir, f"step0-rank{rank}.pt"))
    # then the real loop for a few steps (checkpoint + final model written by rank 0)
    tr2 = Trainer(cfg.replace(out=cfg.out + "-loop"))
    s = tr2.train()
    torch.save({"summary": s, "params": {n: p.detach().clone() for n, p in tr2.model.named_parameters()}},
               os.path.join(result_dir, f"loop-rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, corpus):
    from ringlinear.train.config import get_train_preset
    tmp = tmp_path_factory.mktemp("ddp")
    base = get_train_preset("tiny-test").replace(data=[corpus], progress=False, plot=False, steps=3, eval_every=0,
                                                 save_every=0, seq_aux_loss_coef=1e-2, threads=1,
                                                 device="cpu")  # gloo: CPU processes, also on a CUDA box
    single_cfg = base.replace(out=str(tmp / "one"), batch_size=4, grad_accum=2)  # 8 rows per step
    single = _first_step(Trainer(single_cfg))
    single_loop = Trainer(single_cfg.replace(out=str(tmp / "one-loop"))).train()
    # two processes x 4 rows, sharing the single run's tokenizer so both see identical tokens
    two_cfg = base.replace(out=str(tmp / "two"), batch_size=4, grad_accum=1, tokenizer=str(tmp / "one" / "tokenizer"))
    mp.spawn(_worker, args=(2, _free_port(), two_cfg.to_dict(), str(tmp)), nprocs=2, join=True)
    ranks = [torch.load(tmp / f"step0-rank{r}.pt", weights_only=False) for r in range(2)]
    loops = [torch.load(tmp / f"loop-rank{r}.pt", weights_only=False) for r in range(2)]
    one_params = dict(RingLinearForCausalLM.from_pretrained(tmp / "one-loop" / "final").named_parameters())
    return single, ranks, single_loop, loops, one_params


def test_two_gloo_processes_same_gradients_as_one(ddp_results):
    single, ranks, *_ = ddp_results
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == single["tokens"]
    assert ranks[0]["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert ranks[0]["aux"] == pytest.approx(single["aux"], rel=1e-5) and single["aux"] > 0
    assert single["grads"].keys() == ranks[0]["grads"].keys() == ranks[1]["grads"].keys()
    worst = 0.0
    for n, g in single["grads"].items():
        assert torch.equal(ranks[0]["grads"][n], ranks[1]["grads"][n]), n  # DDP: identical on every rank
        scale = g.abs().max().clamp_min(1e-12)
        worst = max(worst, float((ranks[0]["grads"][n] - g).abs().max() / scale))
    assert worst < 1e-5, worst  # fp32 rounding of a different summation order, nothing more
    # Aux-loss-free balancing saw the global counts: same statistics and the same bias update on every rank.
    assert ranks[0]["moe"] == ranks[1]["moe"] == pytest.approx(single["moe"])
    for n, b in single["bias"].items():
        assert torch.equal(ranks[0]["bias"][n], b) and torch.equal(ranks[1]["bias"][n], b)


def test_two_process_training_loop_matches_one(ddp_results):
    single, ranks, single_loop, loops, one_params = ddp_results
    s0, s1 = loops[0]["summary"], loops[1]["summary"]
    assert s0["step"] == s1["step"] == single_loop["step"] == 3 and s0["world_size"] == 2
    assert s0["loss_end"] == pytest.approx(single_loop["loss_end"], rel=1e-4)
    for n, p in one_params.items():
        assert torch.equal(loops[0]["params"][n], loops[1]["params"][n]), n  # ranks stay in sync
        torch.testing.assert_close(loops[0]["params"][n], p.detach(), rtol=0, atol=2e-5)


def _fsdp_worker(rank, world, port, cfg_dict, result_dir):
    _init(rank, world, port)
    cfg = TrainConfig.from_dict(cfg_dict)
    straight = Trainer(cfg.replace(out=cfg.out + "-a")).train()
    Trainer(cfg.replace(out=cfg.out + "-b", stop_at=2)).train()
    resumed = Trainer(cfg.replace(out=cfg.out + "-b", resume="auto")).train()
    torch.save({"straight": straight, "resumed": resumed}, os.path.join(result_dir, f"fsdp-rank{rank}.pt"))
    dist.destroy_process_group()


def test_fsdp2_two_processes(ddp_results, tmp_path, corpus):
    """--fsdp on two gloo processes: trains like one process on the combined batch; its checkpoints resume
    exactly (optimizer state gathered by parameter name, routed experts replicated)."""
    from ringlinear.train.config import get_train_preset
    from ringlinear.train.report import read_metrics
    _, _, single_loop, _, one_params = ddp_results
    tok = os.path.join(os.path.dirname(single_loop["model_dir"]), "tokenizer")
    cfg = get_train_preset("tiny-test").replace(data=[corpus], progress=False, plot=False, steps=3, eval_every=0,
                                                save_every=0, seq_aux_loss_coef=1e-2, threads=1, batch_size=4,
                                                fsdp=True, tokenizer=tok, out=str(tmp_path / "fsdp"), device="cpu")
    mp.spawn(_fsdp_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    r = torch.load(tmp_path / "fsdp-rank0.pt", weights_only=False)
    assert r["straight"]["loss_end"] == pytest.approx(single_loop["loss_end"], rel=1e-4)
    final = dict(RingLinearForCausalLM.from_pretrained(tmp_path / "fsdp-a" / "final").named_parameters())
    for n, p in one_params.items():
        torch.testing.assert_close(final[n], p.detach(), rtol=0, atol=2e-5)
    la = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "fsdp-a" / "metrics.jsonl") if "loss" in m}
    lb = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "fsdp-b" / "metrics.jsonl") if "loss" in m}
    assert la == lb and sorted(la) == [1, 2, 3]
