"""Helpers for the tests (imported by tests only, never by the package): tiny real checkpoints, weight
perturbation, and gloo process groups for the multi-process tests."""
from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile

import torch

from .models.demo import make_tiny_checkpoint, train_tiny_tokenizer

__all__ = ["make_tiny_checkpoint", "perturb_norms_and_biases", "train_tiny_tokenizer", "spawn_gloo", "free_port"]


@torch.no_grad()
def perturb_norms_and_biases(model, seed: int = 0, bias_std: float = 0.05):
    """Give norm weights (1 + 0.1 N) and expert biases (bias_std N) random values, so no term of a test hides
    behind a weight of 1 or a bias of 0. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if hasattr(mod, "expert_bias"):
            mod.expert_bias.copy_(torch.randn(mod.expert_bias.shape, generator=g) * bias_std)
        if hasattr(mod, "variance_epsilon") and hasattr(mod, "weight"):
            mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank, world, port, out_dir, fn, args):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = fn(rank, world, *args)
        tmp = os.path.join(out_dir, f"rank{rank}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(res, f)
        os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))
        del res
        dist.barrier()  # no rank tears its connections down while a peer's last collective is still in flight
    finally:
        dist.destroy_process_group()
    # The result is on disk: leave without the interpreter's teardown. A CI run once lost a 4-rank test to a
    # SIGABRT in one rank ("terminate called without an active exception", a C++ thread destroyed unjoined); where
    # is not known, but the teardown, which destroys gloo's and ATen's threads from static destructors, is the
    # likeliest place, and no test here is about it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(fn, world: int, *args) -> list:
    """fn(rank, world, *args) in `world` fresh processes sharing one gloo process group (one torch thread each);
    returns each rank's result (pickled through a file), in rank order. A failing rank fails the call with its
    traceback. fn must be importable (a module-level function)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_gloo_entry, args=(world, free_port(), d, fn, args), nprocs=world, join=True)
        except mp.ProcessExitedException as e:  # a signal, not a Python error: say how far the ranks had got
            done = [r for r in range(world) if os.path.exists(os.path.join(d, f"rank{r}.pkl"))]
            raise RuntimeError(f"{e} (ranks that had written their result: {done or 'none'})") from e
        out = []
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
        return out
