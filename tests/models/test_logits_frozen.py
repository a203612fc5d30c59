"""The tiny model's logits are bitwise those recorded before the package layout was refactored (issue 9).

`data/tiny_logits_v1.pt` holds, for a fixed random tiny model (seed 0, norms and expert biases perturbed), the
sha256 of the fp32 logits of a full forward, a left-padded batch, a cached decode step after it and a packed
(`cu_seqlens`) forward, plus the decode-step logits themselves (to show how far off a failure is). A pure move of
code must reproduce every bit. The record is of this machine kind's CPU path (torch version and CPU capability
stored with it); elsewhere float rounding may differ, and the test says so instead of failing. Regenerate only at
a commit known to be right: `PYTHONPATH=. python tests/models/test_logits_frozen.py --write`.
"""
import hashlib
import os
import sys

import pytest
import torch

from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.testing import perturb_norms_and_biases

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_logits_v1.pt")


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def compute() -> dict:
    """On one thread: with more, some CPU kernels split their work by the thread count and round differently."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compute()
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def _compute() -> dict:
    from ringlinear import get_preset
    model = perturb_norms_and_biases(RingLinearForCausalLM.from_config(get_preset("tiny"), seed=0), seed=1).eval()
    g = torch.Generator().manual_seed(123)
    a = torch.randint(3, 384, (9,), generator=g)
    b = torch.randint(3, 384, (5,), generator=g)
    full = model(a[None]).logits                                           # [1, 9, V]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 4:], mask[1, 4:] = b, 1                                         # left padding
    out = model(ids, attention_mask=mask, use_cache=True)
    padded = out.logits                                                    # [2, 9, V]
    decode = model(torch.tensor([[7], [11]]), attention_mask=torch.ones(2, 1, dtype=torch.long),
                   cache=out.cache).logits                                 # [2, 1, V]
    packed = model(torch.cat([a, b])[None], cu_seqlens=torch.tensor([0, 9, 14])).logits  # [1, 14, V]
    logits = {"full": full, "padded": padded, "decode": decode, "packed": packed}
    return {"sha256": {k: _sha(v) for k, v in logits.items()}, "decode": decode.clone(),
            "torch": str(torch.__version__), "cpu": torch.backends.cpu.get_cpu_capability()}


def test_logits_bitwise_as_recorded():
    ref = torch.load(PATH, weights_only=True)
    if (ref["torch"], ref["cpu"]) != (torch.__version__, torch.backends.cpu.get_cpu_capability()):
        pytest.skip(f"reference recorded with torch {ref['torch']} on {ref['cpu']}; this is torch "
                    f"{torch.__version__} on {torch.backends.cpu.get_cpu_capability()}: float rounding may differ")
    now = compute()
    diff = (now["decode"] - ref["decode"]).abs().max().item()
    assert now["sha256"] == ref["sha256"], f"logits changed (decode step max |diff| {diff:.3g})"


if __name__ == "__main__" and "--write" in sys.argv:
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    torch.save(compute(), PATH)
    print(f"wrote {PATH} ({os.path.getsize(PATH)} bytes)")
