"""The KV block manager: reference counts, prefix hits on chained keys that see images, LRU
eviction of cached blocks, and no block ever lost."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl.engine.block_manager import BlockManager, NoRoom, block_keys, image_key

BS = 4


def keys(ids, images=()):
    return block_keys(np.asarray(ids, dtype=np.int64), BS, list(images))


def accounted(bm: BlockManager) -> bool:
    """Every block is exactly one of: free, evictable, in use."""
    used = {b.id for b in bm.blocks if b.ref_count > 0}
    free, evictable = set(bm.free_ids), set(bm.evictable)
    return len(free) + len(evictable) + len(used) == bm.num_blocks and not (free & evictable) and not (used & (free | evictable))


def test_allocate_reserves_every_token_and_free_gives_them_back():
    bm = BlockManager(8, BS)
    table, cached = bm.allocate(keys(range(10)), total_tokens=10 + 6, max_cached_tokens=9)
    assert len(table) == 4 and cached == 0 and bm.num_free == 4
    with pytest.raises(NoRoom):
        bm.allocate([], total_tokens=17, max_cached_tokens=0)  # 5 blocks: nothing taken
    assert bm.num_free == 4 and accounted(bm)
    bm.free(table)
    assert bm.num_free == 8 and accounted(bm)


def test_a_repeated_prefix_shares_blocks_without_copying():
    bm = BlockManager(16, BS)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    k = keys(prompt)
    a, _ = bm.allocate(k, 12, max_cached_tokens=9)
    for b, key in zip(a, k):  # a's prefill computed them
        bm.register(b, key)
    b_table, cached = bm.allocate(k, 12, max_cached_tokens=9)
    assert b_table[:2] == a[:2] and cached == 2 * BS
    assert bm.blocks[a[0]].ref_count == 2
    bm.free(a)
    bm.free(b_table)
    assert accounted(bm) and set(bm.evictable) == set(a[:2])  # kept for the next one


def test_the_last_prompt_token_is_never_restored():
    """A prompt of exactly two full blocks restores at most one: its last token's logits are needed."""
    bm = BlockManager(16, BS)
    k = keys(range(8))
    a, _ = bm.allocate(k, 9, max_cached_tokens=7)
    for b, key in zip(a, k):
        bm.register(b, key)
    _, cached = bm.allocate(k, 9, max_cached_tokens=7)
    assert cached == BS


def test_two_images_with_the_same_placeholders_do_not_share_blocks():
    pad = 7
    ids = [1, 2] + [pad] * 8 + [3, 4]
    first = image_key(b"pixels of one image", b"deep", (1, 4, 8))
    other = image_key(b"pixels of another", b"deep", (1, 4, 8))
    a, b = keys(ids, [(2, 8, first)]), keys(ids, [(2, 8, other)])
    assert a[0] != b[0] and a[1] != b[1] and a[2] != b[2]
    assert keys(ids, [(2, 8, first)]) == a  # deterministic
    assert keys([1, 2, 3, 4]) == keys([1, 2, 3, 4, 5])[:1]  # a block's key depends on what precedes it only
    assert keys([9, 2, 3, 4, 5, 6, 7, 8])[1] != keys([1, 2, 3, 4, 5, 6, 7, 8])[1]  # chained


def test_cached_blocks_are_evicted_least_recently_used_first():
    bm = BlockManager(4, BS)
    old, new = keys(range(0, 4)), keys(range(50, 54))
    for k in (old, new):
        t, _ = bm.allocate(k, 5, max_cached_tokens=4)
        bm.register(t[0], k[0])
        bm.free(t)
    assert bm.num_free == 4 and len(bm.evictable) == 2
    t, _ = bm.allocate([], 12, max_cached_tokens=0)  # 3 blocks: 2 free + the oldest cached
    assert bm.cached_prefix(old) == [] and len(bm.cached_prefix(new)) == 1
    bm.free(t)
    assert accounted(bm)


def test_hit_blocks_that_sit_evictable_do_not_count_as_free_room():
    bm = BlockManager(3, BS)
    k = keys(range(8))
    t, _ = bm.allocate(k, 8, max_cached_tokens=7)
    bm.register(t[0], k[0])
    bm.free(t)
    # restoring block 0 takes it out of the evictable list: 2 blocks left, 3 more needed
    with pytest.raises(NoRoom):
        bm.allocate(k, 16, max_cached_tokens=7)
    assert accounted(bm) and bm.num_free == 3
