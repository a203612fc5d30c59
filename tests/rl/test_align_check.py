"""Aligned numerics on CPU: the engine's log-probs equal `sequence_logprobs` bit for bit for 16 prompts of 1-300
tokens with 48 sampled tokens each, however the engine schedules them (alone, with 15 others, prefill chunks of 64
or 512, a token budget that splits prompts differently, after preemptions); in default mode `align-check` measures
a mismatch and names where it starts."""
import json

import pytest
import torch

from ringlinear.cli import main
from ringlinear.engine import LLM, SamplingParams
from ringlinear.rl import MISMATCH_KEYS, sequence_logprobs
from ringlinear.rl.align_check import _prompts, align_check

PROMPTS = _prompts(16, 384, 300, seed=7)


def _served(tiny_dir, numerics, alone=False, **kw):
    llm = LLM(tiny_dir, device="cpu", numerics=numerics, max_num_seqs=16, num_kv_blocks=kw.pop("blocks", 512), **kw)
    params = [SamplingParams(max_tokens=48, temperature=1.0, seed=100 + i, logprobs=True, ignore_eos=True)
              for i in range(16)]
    if alone:
        outs = [llm.generate([p], [sp])[0] for p, sp in zip(PROMPTS, params)]
    else:
        outs = llm.generate(PROMPTS, params)
    return llm, outs


@pytest.fixture(scope="module")
def reference(tiny_dir):
    llm, outs = _served(tiny_dir, "aligned", prefill_chunk=64, max_num_batched_tokens=256)
    with torch.no_grad():
        train = sequence_logprobs(llm.engine.model, PROMPTS, [o.token_ids for o in outs], numerics="aligned")
    return outs, train


@pytest.mark.parametrize("how", [dict(prefill_chunk=64, max_num_batched_tokens=256),
                                 dict(prefill_chunk=512, max_num_batched_tokens=1024),
                                 dict(prefill_chunk=64, max_num_batched_tokens=96),
                                 dict(prefill_chunk=64, max_num_batched_tokens=256, alone=True),
                                 dict(prefill_chunk=64, max_num_batched_tokens=256, blocks=60)])
def test_engine_logprobs_equal_training_forward_bitwise(tiny_dir, reference, how):
    ref_outs, train = reference
    llm, outs = _served(tiny_dir, "aligned", **how)
    if how.get("blocks"):
        assert sum(o.num_preemptions for o in outs) > 0  # the small cache did preempt
    for o, r, t in zip(outs, ref_outs, train):
        assert o.token_ids == r.token_ids  # same tokens however scheduled
        assert torch.equal(torch.tensor(o.logprobs, dtype=torch.float32), t)


def test_align_check_default_mode_measures_and_locates(tiny_dir):
    from ringlinear.models.modeling import RingLinearForCausalLM
    model = RingLinearForCausalLM.from_pretrained(tiny_dir)
    res = align_check(model, "default", n_prompts=6, max_tokens=12, max_prompt=140)
    assert res["max_abs_dlogp"] > 0 and res["divergence"] is not None
    assert res["divergence"]["max_abs_diff"] > 0
    res = align_check(model, "aligned", n_prompts=6, max_tokens=12, max_prompt=140)
    assert all(res[k] == 0.0 for k in MISMATCH_KEYS) and res["divergence"] is None


def test_align_check_cli(tiny_dir, capsys):
    assert main(["align-check", "--model", tiny_dir, "--prompts", "3", "--max-tokens", "4", "--max-prompt", "70",
                 "--device", "cpu"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(MISMATCH_KEYS) <= set(last) and last["max_abs_dlogp"] == 0.0
    assert main(["align-check", "--model", tiny_dir, "--prompts", "0"]) == 1
    assert main(["align-check", "--model", tiny_dir + "-missing"]) == 1


def test_unknown_numerics_is_a_clear_error(tiny_dir):
    from ringlinear.engine import EngineConfig
    with pytest.raises(ValueError, match="numerics must be one of"):
        EngineConfig(numerics="exact")
    with pytest.raises(ValueError, match="batch_invariant=False contradicts"):
        EngineConfig(numerics="aligned", batch_invariant=False)
