"""Same-host transfer regions (qwen3vl.shm), in one process: the language side's pool and the
encoder side's writer over real POSIX shared memory."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch

from qwen3vl.disagg import shm
from qwen3vl.errors import UNSUPPORTED, SharedMemoryUnavailable, code_of
from qwen3vl.disagg.fetch import Buffers
from qwen3vl.features import VisualFeatures

HIDDEN, LAYERS = 8, 3
TOKEN_BYTES = shm.token_bytes(HIDDEN, LAYERS, 4)  # fp32; bf16 and fp16 regions hold twice the tokens


class _Config:  # what Buffers.allocate reads of a ModelConfig
    visual_hidden_size, deepstack_layers = HIDDEN, LAYERS


def features(n: int, dtype: torch.dtype, seed: int = 0) -> VisualFeatures:
    g = torch.Generator().manual_seed(seed)
    return VisualFeatures(torch.randn(n, HIDDEN, generator=g).to(dtype),
                          torch.randn(LAYERS, n, HIDDEN, generator=g).to(dtype), np.array([[1, 2, n // 2]]))


@pytest.fixture
def writer():
    w = shm.RegionWriter()
    yield w
    w.close()


def exists(region: shm.Region) -> bool:
    return os.path.exists(os.path.join(shm.SHM_DIR, region.name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_whole_image_is_lent_bit_for_bit_and_comes_back_when_freed(writer, dtype):
    pool = shm.RegionPool(HIDDEN, LAYERS, dtype, max_bytes=64 * TOKEN_BYTES, keep=2)
    region = pool.take(10)
    sent = features(10, dtype)
    writer.write(region.name, sent)
    arrived = Buffers.filled(pool.lend(region, 10, sent.image_grid_thw)).features(dtype)
    assert arrived.visual_embeds.dtype == arrived.deepstack_embeds.dtype == dtype
    assert torch.equal(arrived.visual_embeds, sent.visual_embeds)
    assert torch.equal(arrived.deepstack_embeds, sent.deepstack_embeds)
    assert not pool.has_idle()  # lent while the tensors live
    del arrived
    gc.collect()
    assert pool.take(10) is region
    pool.give_back(region)
    pool.close()
    assert not exists(region)


def test_a_partial_chunk_is_read_packed_and_copied(writer):
    pool = shm.RegionPool(HIDDEN, LAYERS, torch.float32, max_bytes=64 * TOKEN_BYTES, keep=2)
    region = pool.take(16)
    sent = features(16, torch.float32)
    buf = Buffers.allocate(16, sent.image_grid_thw, _Config, np.dtype(np.float32))
    for start in (0, 6, 12):  # chunks of 6, 6 and 4 tokens through one region
        end = min(start + 6, 16)
        writer.write(region.name, VisualFeatures(sent.visual_embeds[start:end],
                                                 sent.deepstack_embeds[:, start:end], None))
        buf.write(start, region.read(end - start, None)[0], "test")
    got = buf.features(torch.float32)
    assert torch.equal(got.visual_embeds, sent.visual_embeds)
    assert torch.equal(got.deepstack_embeds, sent.deepstack_embeds)
    pool.give_back(region)
    pool.close()


def test_take_picks_the_smallest_fitting_region_and_caps_new_ones():
    pool = shm.RegionPool(HIDDEN, LAYERS, torch.float32, max_bytes=100 * TOKEN_BYTES, keep=3)
    with pytest.raises(LookupError):
        pool.take(None)  # nothing idle and no size: the caller probes first
    small, large = pool.take(10), pool.take(50)
    assert (small.tokens, large.tokens) == (10, 50)
    capped = pool.take(1000)
    assert capped.tokens == 100  # capped: a larger image takes several responses
    capped.close()
    pool.give_back(small)
    pool.give_back(large)
    assert pool.take(5) is small
    pool.give_back(small)
    assert pool.take(None) is large  # size unknown: the largest
    pool.give_back(large)
    pool.close()
    assert not exists(small) and not exists(large)


def test_the_pool_keeps_at_most_keep_idle_regions():
    pool = shm.RegionPool(HIDDEN, LAYERS, torch.float32, max_bytes=100 * TOKEN_BYTES, keep=1)
    small, large = pool.take(10), pool.take(50)
    pool.give_back(large)
    pool.give_back(small)  # one too many: the smallest goes
    assert not exists(small) and exists(large)
    pool.close()
    after_close = pool.take(20)
    pool.give_back(after_close)  # a closed pool frees what comes back
    assert not exists(large) and not exists(after_close)


def test_the_writer_refuses_regions_it_must_not_touch(writer):
    sent = features(4, torch.float32)
    for name, why in [("../etc/passwd", "not a transfer region"), ("qwen3vl-transfer-x/../../y", "not a transfer region"),
                      ("qwen3vl-transfer-absent", "does not exist on the encoder's host")]:
        with pytest.raises(SharedMemoryUnavailable, match=why) as e:
            writer.write(name, sent)
        assert code_of(e.value) == UNSUPPORTED  # the language server's cue to use gRPC
    region = shm.Region(3, HIDDEN, LAYERS, torch.float32)  # room for 3 tokens, not 4
    try:
        with pytest.raises(SharedMemoryUnavailable, match="the request needs"):
            writer.write(region.name, sent)
        assert os.path.getsize(os.path.join(shm.SHM_DIR, region.name)) == region.size  # never grown
    finally:
        region.close()


def test_the_writer_lets_go_of_regions_their_owner_removed(writer):
    first, second = shm.Region(4, HIDDEN, LAYERS, torch.float32), shm.Region(4, HIDDEN, LAYERS, torch.float32)
    writer.write(first.name, features(4, torch.float32))
    first.close()
    writer.write(second.name, features(4, torch.float32))  # mapping a new region sweeps the dead ones
    assert list(writer.mapped) == [second.name]
    second.close()


def test_a_region_discarded_while_lent_does_not_come_back():
    pool = shm.RegionPool(HIDDEN, LAYERS, torch.float32, max_bytes=100 * TOKEN_BYTES, keep=2)
    region = pool.take(4)
    lent = pool.lend(region, 4, None)
    region.close()  # e.g. an error after lending
    del lent
    gc.collect()
    assert not pool.has_idle()
    pool.close()


def test_the_writer_follows_no_links_and_writes_no_sparse_files(writer, tmp_path):
    sent = features(4, torch.float32)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me" * 1000)
    link = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}link-{os.getpid()}")
    os.symlink(victim, link)
    try:
        with pytest.raises(SharedMemoryUnavailable, match="shared-memory region"):
            writer.write(os.path.basename(link), sent)
    finally:
        os.unlink(link)
    assert victim.read_bytes() == b"keep me" * 1000
    sparse = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}sparse-{os.getpid()}")
    with open(sparse, "wb") as f:
        f.truncate(1 << 20)  # no pages behind it: a write could SIGBUS on a full /dev/shm
    try:
        with pytest.raises(SharedMemoryUnavailable, match="sparse"):
            writer.write(os.path.basename(sparse), sent)
    finally:
        os.unlink(sparse)
