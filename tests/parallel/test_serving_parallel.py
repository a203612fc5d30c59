"""Tensor and expert parallelism for serving on gloo processes (CPU, fp32, the tiny model):

- model level: each rank loads its shard of the checkpoint; the logits of a padded batch equal one process's
  (TP: within fp32 rounding of the ranks' partial sums, 2e-5 relative to the largest logit; EP alone and under
  batch-invariant GEMMs: bit for bit);
- engine level: `LLM(..., tensor_parallel=2)` / `expert_parallel=2` (rank 0 schedules, rank 1 follows) generates
  the same greedy tokens as one process, with log-probs within 1e-4 (TP) or equal (EP), batch invariant;
- sizes the group RMSNorm cannot take are refused in one line naming the limit.
"""
import pytest
import torch
import torch.distributed as dist

from ringlinear.engine import LLM, SamplingParams
from ringlinear.models.config import RingLinearConfig
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.ops.linear import RowBlockMode
from ringlinear.parallel.tensor import check_serving_parallel, load_sharded, random_sharded
from ringlinear.testing import make_tiny_checkpoint, spawn_gloo

TP_TOL = 2e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference runs here; the ranks get cpu_threads=1
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tp") / "tiny"))  # 4 heads, 2 KV heads, 2 norm groups


@pytest.fixture(scope="module")
def tiny_g4(tmp_path_factory):
    """4 norm groups: TP 4 is allowed, each rank one head and one replicated KV head."""
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tp4") / "tiny"), group_norm_size=4, seed=3)


def _batch():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 384, (3, 48), generator=g)
    mask = torch.ones(3, 48, dtype=torch.long)
    mask[1, :17] = 0  # left padding
    mask[2, 30:] = 0  # right padding
    return ids, mask


def _logits(model, invariant):
    ids, mask = _batch()
    with torch.inference_mode(), RowBlockMode() if invariant else torch.no_grad():
        return model(ids, attention_mask=mask).logits


def _rank_logits(rank, world, path, tp, invariant):
    model = load_sharded(path, rank, world, tp, dist.group.WORLD, dtype="float32", device="cpu")
    return _logits(model, invariant)


def _rank_random(rank, world, cfg, tp):
    return _logits(random_sharded(cfg, rank, world, tp, dist.group.WORLD if world > 1 else None, "float32"), False)


def _single(path, invariant):
    return _logits(RingLinearForCausalLM.from_pretrained(path, dtype=torch.float32), invariant)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_tp2_and_ep2_logits(tiny):
    ref = _single(tiny, False)
    tp = spawn_gloo(_rank_logits, 2, tiny, 2, False)
    assert torch.equal(tp[0], tp[1])  # every rank ends with the same (replicated) head output
    assert _rel(tp[0], ref) < TP_TOL
    ep = spawn_gloo(_rank_logits, 2, tiny, 1, True)
    assert torch.equal(ep[0], _single(tiny, True))  # EP alone: one process's arithmetic, bit for bit


def test_tp4_replicated_kv_heads(tiny_g4):
    ranks = spawn_gloo(_rank_logits, 4, tiny_g4, 4, False)
    assert all(torch.equal(r, ranks[0]) for r in ranks)
    assert _rel(ranks[0], _single(tiny_g4, False)) < TP_TOL


def test_random_weights_are_pieces_of_one_model(tiny):
    """Benchmarks serve random weights without a checkpoint: each rank's are its cut of one model."""
    cfg = RingLinearConfig.from_json(tiny)
    ranks = spawn_gloo(_rank_random, 2, cfg, 2)
    assert _rel(ranks[0], _rank_random(0, 1, cfg, 1)) < TP_TOL


def test_bad_sizes_refused(tiny):
    cfg = RingLinearConfig.from_json(tiny)
    msg = r"--tp 4 does not divide this model: .*group_norm_size 2 .*valid --tp: 1, 2\)$"
    with pytest.raises(ValueError, match=msg):
        check_serving_parallel(cfg, 4, 1)
    with pytest.raises(ValueError, match="must be equal"):
        check_serving_parallel(cfg, 2, 4)
    with pytest.raises(ValueError, match="do not divide the model's 8 routed experts"):
        check_serving_parallel(cfg, 1, 3)
    with pytest.raises(ValueError, match="group_norm_size"):
        LLM(tiny, device="cpu", tensor_parallel=4)  # refused before any rank starts


def _generate(llm, prompts, n=8):
    params = SamplingParams(temperature=0.0, max_tokens=n, logprobs=True, ignore_eos=True)
    outs = llm.generate(prompts, params)
    alone = llm.generate([prompts[1]], params)[0]  # the same request without neighbours
    return [o.token_ids for o in outs], [o.logprobs for o in outs], alone


@pytest.fixture(scope="module")
def engines(tiny):
    kw = dict(device="cpu", cpu_threads=1, max_num_seqs=4, num_kv_blocks=64, prefill_chunk=64,
              max_num_batched_tokens=128)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 384, (L,), generator=g).tolist() for L in (9, 70, 33)]  # 70: two prefill pieces
    out = {"one": _generate(LLM(tiny, **kw), prompts)}
    for name, extra in (("tp2", {"tensor_parallel": 2}), ("ep2", {"expert_parallel": 2})):
        with LLM(tiny, **kw, **extra) as llm:
            out[name] = _generate(llm, prompts)
    return out


@pytest.mark.parametrize("name", ["tp2", "ep2"])
def test_engine_greedy_tokens_equal_one_process(engines, name):
    tokens, lps, alone = engines[name]
    tokens1, lps1, _ = engines["one"]
    assert tokens == tokens1
    for a, b in zip(lps, lps1):
        if name == "ep2":
            assert a == b  # batch-invariant GEMMs (the CPU default): the same arithmetic
        else:
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    # batch invariance within the world size: alone or beside others, the same bits
    assert alone.token_ids == tokens[1] and alone.logprobs == lps[1]
