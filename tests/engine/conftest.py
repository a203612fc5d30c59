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


@pytest.fixture(scope="session")
def run_engine():
    """run_engine(engine, check=None) -> {request id: final output} for every queued request, stepping until
    none is left; check(engine) runs after every step."""
    def run(eng, check=None):
        done = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o
            if check is not None:
                check(eng)
        return done
    return run


@pytest.fixture(scope="session")
def check_blocks():
    """check_blocks(engine): every KV block's reference count is the number of running requests whose table
    lists it, nothing else holds one, and the free count is every block no request holds."""
    from collections import Counter

    def check(eng):
        pool = eng.kv.allocator
        held = Counter(b for s in eng.scheduler.running for b in s.block_table)
        assert all(not s.block_table and s.slot is None for s in eng.scheduler.waiting)
        assert [pool.ref[b] for b in range(pool.n)] == [held.get(b, 0) for b in range(pool.n)]
        assert pool.num_free == pool.n - len(held)
        assert len(pool.key_of) == len(pool.block_of)
    return check
