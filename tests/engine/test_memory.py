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
