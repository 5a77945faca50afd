"""The KV block manager: a fixed pool of KV blocks, block tables per sequence, and prefix
caching on blocks (after vLLM's and nano-vllm's block managers).

A block holds `block_size` consecutive tokens of one sequence's KV. A full block of a prompt
gets a key that chains the previous block's key with its token ids and, for every image whose
visual tokens fall in it, that image's content hash and the offset of the block inside it:
placeholder ids are the same for every image, so ids alone would let two different images of
one size share KV. A later prompt that starts with the same blocks takes them (reference
counted, no copy). Blocks nobody uses keep their key and are evicted least recently used first
when the pool runs short.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np


@dataclass
class Block:
    id: int
    ref_count: int = 0
    key: bytes | None = None  # set once the block's KV is computed and it is a full prompt block


class NoRoom(Exception):
    """Not enough free blocks now; the sequence waits."""


class BlockManager:
    """`num_blocks` blocks of `block_size` tokens. Block ids index the model runner's KV pool."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))    # no key, nobody uses them
        self.evictable: OrderedDict[int, None] = OrderedDict()   # keyed, nobody uses them; oldest first
        self.by_key: dict[bytes, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks a new sequence could take now (free or evictable)."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def cached_prefix(self, keys: list[bytes]) -> list[int]:
        """Block ids of the longest run of leading `keys` whose KV is held (used or evictable)."""
        hits = []
        for key in keys:
            block_id = self.by_key.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, keys: list[bytes], total_tokens: int, max_cached_tokens: int) -> tuple[list[int], int]:
        """A block table for a sequence of up to `total_tokens` tokens whose full prompt blocks
        have `keys`: the cached leading blocks (at most `max_cached_tokens` worth), then fresh
        ones. Returns (block table, tokens restored from the cache). Raises NoRoom (nothing
        taken) when the pool cannot hold it now."""
        hits = self.cached_prefix(keys)[:max_cached_tokens // self.block_size]
        need = self.blocks_for(total_tokens) - len(hits)
        # Hits that sit in the evictable list are not free for the fresh blocks.
        reusable = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if need > self.num_free - reusable:
            raise NoRoom
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.evictable[block_id]
            block.ref_count += 1
        table = hits + [self._take() for _ in range(need)]
        return table, len(hits) * self.block_size

    def fork(self, table: list[int], shared: int, total_tokens: int) -> list[int]:
        """A block table for another choice of the sequence that holds `table`: its first
        `shared` blocks (the prompt's full blocks) are the same blocks, reference counted (freed
        when the last choice frees them), the rest fresh, up to `total_tokens` tokens. Raises
        NoRoom (nothing taken) when the pool cannot hold the fresh ones now."""
        need = self.blocks_for(total_tokens) - shared
        if need > self.num_free:
            raise NoRoom
        for block_id in table[:shared]:
            self.blocks[block_id].ref_count += 1
        return table[:shared] + [self._take() for _ in range(need)]

    def _take(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.popleft()
        else:  # evict the least recently used cached block
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            if self.by_key.get(block.key) == block_id:
                del self.by_key[block.key]
            block.key = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def register(self, block_id: int, key: bytes) -> None:
        """Block `block_id` now holds the computed KV of the full prompt block `key`. If another
        block already holds that key (two equal prompts prefilled at once), the first stays."""
        block = self.blocks[block_id]
        if block.key is None and key not in self.by_key:
            block.key = key
            self.by_key[key] = block_id

    def free(self, table: list[int]) -> None:
        """A finished (or failed, or cancelled) sequence gives its blocks back; keyed blocks stay
        cached until evicted, the most recently used last."""
        for block_id in reversed(table):  # a prompt's tail is evicted before its head
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is not None:
                    self.evictable[block_id] = None
                else:
                    self.free_ids.append(block_id)


def image_key(embeds, deepstack, grid: tuple[int, int, int]) -> bytes:
    """Content hash of one image's E->L tensors (what the language model sees of it): embeds
    and deepstack as bytes-like objects, grid its (t, h, w)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(grid, dtype=np.int64).tobytes())
    h.update(embeds)
    h.update(deepstack)
    return h.digest()


def block_keys(input_ids: np.ndarray, block_size: int, images: list[tuple[int, int, bytes]]) -> list[bytes]:
    """Chained keys of the full blocks of a prompt: input_ids [T] int64; images (first token,
    token count, content key) of each image in the prompt."""
    keys, prev = [], b"qwen3vl-blocks-v1"
    for b in range(len(input_ids) // block_size):
        start, end = b * block_size, (b + 1) * block_size
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(np.ascontiguousarray(input_ids[start:end], dtype=np.int64).tobytes())
        for first, count, key in images:
            if first < end and first + count > start:  # the image's tokens overlap this block
                h.update(key)
                h.update(np.int64(start - first).tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys
