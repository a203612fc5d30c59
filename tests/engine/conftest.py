"""Engine tests run the tiny random-weight checkpoint on CPU, one torch thread (a shared 2-core CI box spends
most of its time spinning in OpenMP barriers with two)."""
import pytest
import torch

from ringlinear.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("engine") / "tiny"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def make_llm(tiny_dir):
    from ringlinear.engine import LLM

    def make(**kw):
        kw.setdefault("device", "cpu")  # CPU tests: batch invariance is claimed (and measured) there
        kw.setdefault("max_num_seqs", 8)
        kw.setdefault("num_kv_blocks", 256)
        kw.setdefault("prefill_chunk", 64)
        kw.setdefault("max_num_batched_tokens", 256)
        return LLM(tiny_dir, **kw)
    return make


@pytest.fixture(scope="session")
def random_prompts():
    """random_prompts(n, min_len, max_len, seed) -> n token-id lists (ids 3.. of the tiny vocab)."""
    def make(n, lo, hi, seed, vocab=384):
        g = torch.Generator().manual_seed(seed)
        lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]
    return make
