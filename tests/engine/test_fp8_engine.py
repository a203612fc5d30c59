"""The engine with FP8 weights (quantization="fp8", CPU emulation): greedy tokens equal the FP8 model's own
generate(), log-probs within 1e-5 when generate() runs the engine's row-block GEMMs (with plain GEMMs an fp32
rounding difference can flip an e4m3 code of an activation: measured 2e-4 on one log-prob); the weights exist only
as FP8 codes + scales; a model handed in must match the quantization asked for."""
import pytest
import torch

from ringlinear.engine import LLM, LLMEngine, EngineConfig, SamplingParams
from ringlinear.generation import generate
from ringlinear.models import fp8_serve as S
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.ops.linear import RowBlockMode
from ringlinear.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("fp8engine") / "m"), preset="tiny-fp8", seed=2)


@pytest.fixture(autouse=True)
def emulate(monkeypatch):
    monkeypatch.setenv("RINGLINEAR_BACKEND", "torch")
    monkeypatch.setenv("RINGLINEAR_FP8_EMULATE", "1")


def test_fp8_engine_greedy_matches_the_fp8_models_generate(fp8_dir, random_prompts):
    llm = LLM(fp8_dir, quantization="fp8", device="cpu", max_num_seqs=4, num_kv_blocks=128, prefill_chunk=64,
              max_num_batched_tokens=128)
    model = llm.engine.model
    assert S.is_fp8(model)
    assert model.model.layers[1].mlp.w13.dtype == torch.float8_e4m3fn
    assert not any(p.dtype == torch.float8_e4m3fn for p in model.parameters())      # buffers, no autograd
    prompts = random_prompts(5, 1, 150, seed=3)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, logprobs=True, ignore_eos=True))
    bf = RingLinearForCausalLM.from_pretrained(fp8_dir)
    differs = 0
    for p, o in zip(prompts, outs):
        with RowBlockMode(16):  # the engine's CPU GEMMs (batch invariant), so FP8 codes round alike
            ref = generate(model, [p], max_new_tokens=12, temperature=0)
        assert o.token_ids == ref.sequences[0]
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(ref.logprobs[0]), atol=1e-5, rtol=0)
        differs += generate(bf, [p], max_new_tokens=12, temperature=0).sequences[0] != o.token_ids
    assert differs > 0   # the FP8 model is a different model: the comparison above is not vacuous


def test_a_given_model_must_match_the_quantization(fp8_dir):
    bf = RingLinearForCausalLM.from_pretrained(fp8_dir)
    cfg = dict(device="cpu", max_num_seqs=2, num_kv_blocks=16, prefill_chunk=64, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="quantization='fp8' but the model given is not FP8"):
        LLMEngine(model=bf, config=EngineConfig(quantization="fp8", **cfg))
    eng = LLMEngine(model=S.quantize_fp8_(bf), config=EngineConfig(quantization="fp8", **cfg))
    assert S.is_fp8(eng.model)
    with pytest.raises(ValueError, match="aligned"):
        LLMEngine(model=bf, config=EngineConfig(numerics="aligned", **cfg))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_decode_captures_cuda_graphs_and_matches_eager(fp8_dir, random_prompts, monkeypatch):
    """On the GPU: the FP8 path has no host sync, so decode steps and fresh prefill steps capture; graphed tokens
    equal eager ones."""
    monkeypatch.setenv("RINGLINEAR_BACKEND", "auto")
    kw = dict(quantization="fp8", device="cuda", dtype="bfloat16", max_num_seqs=8, num_kv_blocks=256,
              prefill_chunk=64, max_num_batched_tokens=256, cuda_graph_max_batch=8)
    graphed = LLM(fp8_dir, cuda_graphs=True, **kw)
    assert graphed.engine.runner.graphs is not None, "CUDA graph capture failed (see the warning in the log)"
    assert graphed.engine.runner.prefill_graphs is not None, "prefill graph capture failed (see the log)"
    eager = LLM(fp8_dir, cuda_graphs=False, **kw)
    prompts = random_prompts(6, 1, 150, seed=61)
    sp = SamplingParams(max_tokens=16, temperature=0, logprobs=True, ignore_eos=True)
    for x, y in zip(graphed.generate(prompts, sp), eager.generate(prompts, sp)):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-3, rtol=0)
