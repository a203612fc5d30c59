"""The free list behind KV blocks and state slots, paged KV rows, state slots."""
import pytest
import torch

from ringlinear.engine.free_list import FreeList
from ringlinear.engine.kv_cache import PagedKVCache
from ringlinear.engine.state_pool import StatePool


def test_free_list_reuse_and_double_free():
    a = FreeList(4, "KV block")
    b = a.allocate(3)
    assert b == [0, 1, 2] and a.num_free == 1
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        a.allocate(2)
    a.free(b)
    assert a.num_free == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free([1])


def test_token_rows_follow_the_block_table():
    kv = PagedKVCache([2], num_blocks=8, block_size=4, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                      device="cpu")
    rows = kv.token_rows([5, 2, 7], 2, 10)  # positions 2..9
    assert rows.tolist() == [22, 23, 8, 9, 10, 11, 28, 29]
    assert kv.blocks_needed(8) == 2 and kv.blocks_needed(9) == 3
    assert kv.k[2].shape == (9, 4, 1, 2)  # one scratch block past the allocatable ones


def test_state_slot_is_zeroed_when_handed_out():
    pool = StatePool([0, 1], num_slots=2, num_heads=2, head_dim=3, device="cpu")
    s = pool.allocate()
    pool.states[0][s].fill_(1.0)
    pool.states[1][s].fill_(2.0)
    pool.free(s)
    s2 = pool.allocate()
    assert s2 == s
    assert all(float(t[s2].abs().sum()) == 0 for t in pool.states.values())
    assert pool.states[0].dtype == torch.float32 and pool.states[0].shape == (3, 2, 3, 3)
    pool.allocate()
    with pytest.raises(RuntimeError, match="out of linear-state slots"):
        pool.allocate()


def test_block_pool_refcounts_cache_and_lru_eviction():
    from ringlinear.engine.block_pool import BlockPool
    pool = BlockPool(6)
    a = pool.allocate(3)                           # [0, 1, 2]
    pool.register(a[0], b"k0")
    pool.register(a[1], b"k1")
    pool.register(a[2], b"k0")                     # a key already cached keeps its block; a[2] stays private
    assert pool.cached(b"k0") == a[0] and pool.num_cached == 2
    assert pool.share(a[:2]) == a[:2] and pool.ref[:3] == [2, 2, 1]
    pool.free(a)
    assert pool.ref[:3] == [1, 1, 0] and pool.num_free == 4
    pool.free(a[:2])                               # idle now: cached, counted free, not yet reused
    assert pool.num_free == 6 and pool.num_cached == 2
    assert pool.share([a[1]]) == [a[1]] and pool.num_idle(a[:2]) == 1
    b = pool.allocate(4)                           # never-cached blocks go first ...
    assert a[0] not in b and pool.num_evicted == 0
    c = pool.allocate(1)                           # ... then the least recently used idle one
    assert c == [a[0]] and pool.num_evicted == 1 and pool.cached(b"k0") is None
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        pool.allocate(1)                           # a[1] is held: never evicted
    pool.free(c)                                   # no key any more: straight back to the free list
    with pytest.raises(RuntimeError, match="cannot be shared"):
        pool.share(c)
    pool.free([a[1]] + b)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([b[0]])
    pool.reset()
    assert pool.num_cached == 0 and pool.num_free == 6 and all(r == 0 for r in pool.ref)


def test_snapshot_pool_keeps_at_most_its_budget_lru():
    from ringlinear.engine.prefix_cache import SnapshotPool
    states = StatePool([0, 3], num_slots=2, num_heads=2, head_dim=3, device="cpu")
    snaps = SnapshotPool([0, 3], num=2, num_heads=2, head_dim=3, device="cpu")
    s = states.allocate()
    for value, key in ((1.0, b"a"), (2.0, b"b")):
        for t in states.states.values():
            t[s].fill_(value)
        snaps.save(key, states, s)
    snaps.save(b"a", states, s)                    # known key: only marked recently used (keeps 1.0)
    for t in states.states.values():
        t[s].fill_(3.0)
    snaps.save(b"c", states, s)                    # full: evicts b, the least recently used
    assert len(snaps) == 2 and b"b" not in snaps and snaps.num_evicted == 1
    snaps.restore(b"a", states, s)
    assert all(bool((t[s] == 1.0).all()) for t in states.states.values())
    assert snaps.memory_bytes() == 2 * snaps.bytes_each == 2 * 2 * 2 * 3 * 3 * 4
