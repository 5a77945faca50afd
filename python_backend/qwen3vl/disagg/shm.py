"""Same-host E->L transfer through POSIX shared memory, written by the encoder model itself.

The language server creates a region (`Region`) and names it in its request; the encoder
model maps it (`RegionWriter`) and copies the requested visual tokens straight in, and its
response carries only the small tensors. Going through Triton's shared-memory extension
instead costs two more copies of the payload in the encoder server (the Python stub into its
shared memory with the server, then the server into the registered region).

A response of n visual tokens (model dtype, hidden size H, L deepstack layers) is packed at
the start of the region: visual_embeds [n, H] at byte 0, deepstack_embeds [L, n, H] right
after it. When that is the whole image, the language side hands the region itself on as the
image's tensors (no copy) and takes it back for another fetch once they are freed.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
import time
import uuid
import weakref
from collections import OrderedDict

import numpy as np
import torch

from .. import contract
from ..errors import SharedMemoryUnavailable
from ..features import VisualFeatures, WireFeatures
from ..tensors import numpy_dtype

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory objects (shm_open names)
# Only objects named like this are ever opened by an encoder: a request cannot make it write
# into anything else on the host.
PREFIX = contract.SHM_REGION_PREFIX


def token_bytes(hidden: int, layers: int, element_size: int) -> int:
    """Bytes of one visual token: its row of visual_embeds and of each deepstack layer."""
    return hidden * element_size * (1 + layers)


def _map(fd: int, size: int) -> mmap.mmap:
    # MAP_POPULATE: fault every page in now, not one by one during the first copy.
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class Region:
    """A region this process creates and owns (the language side), for up to `tokens` visual tokens."""

    def __init__(self, tokens: int, hidden: int, layers: int, dtype: torch.dtype):
        self.tokens, self.hidden, self.layers, self.dtype = tokens, hidden, layers, dtype
        self.token_bytes = token_bytes(hidden, layers, torch.empty((), dtype=dtype).element_size())
        self.size = tokens * self.token_bytes
        self.name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.closed = False
        fd = os.open(os.path.join(SHM_DIR, self.name), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            # Allocated now, not sparse: a full /dev/shm fails here (ENOSPC), not as a SIGBUS
            # in whichever process first touches a page that cannot be backed.
            os.posix_fallocate(fd, 0, self.size)
            self.map = _map(fd, self.size)
        except Exception:
            os.unlink(os.path.join(SHM_DIR, self.name))
            raise
        finally:
            os.close(fd)

    def read(self, n: int, grids) -> tuple[WireFeatures, np.ndarray]:
        """numpy views (no copy) of the n tokens the last response wrote, [n, H] and [L, n, H],
        and the array they are views of (alive as long as any of them)."""
        flat = np.frombuffer(self.map, numpy_dtype(self.dtype), n * (1 + self.layers) * self.hidden)
        rows = n * self.hidden
        return WireFeatures(flat[:rows].reshape(n, self.hidden),
                            flat[rows:].reshape(self.layers, n, self.hidden), grids), flat

    def close(self) -> None:
        """Unlink the name (an encoder's mapping keeps the memory until it lets go) and unmap."""
        self.closed = True
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass
        try:
            self.map.close()
        except BufferError:  # views still alive: unmapped with the last of them
            pass


class RegionPool:
    """The language side's regions: taken for a fetch, given back after it, or lent out as an
    image's tensors and given back when those are freed. Keeps at most `keep` idle ones."""

    def __init__(self, hidden: int, layers: int, dtype: torch.dtype, max_bytes: int, keep: int):
        self.hidden, self.layers, self.dtype, self.keep = hidden, layers, dtype, keep
        self.max_tokens = max(1, max_bytes // token_bytes(hidden, layers, torch.empty((), dtype=dtype).element_size()))
        self.idle: list[Region] = []
        # Re-entrant: give_back runs from a finalizer, which may fire inside take or give_back.
        self.lock = threading.RLock()
        self.closed = False

    def has_idle(self) -> bool:
        return bool(self.idle)

    def take(self, tokens: int | None) -> Region:
        """The smallest idle region holding `tokens` (capped at max_tokens), else a new one of
        that size; with `tokens` None (size not known yet), the largest idle one."""
        with self.lock:
            if tokens is None:
                if not self.idle:
                    raise LookupError("no idle region, and no size to make one")
                best = max(self.idle, key=lambda r: r.tokens)
            else:
                tokens = min(max(tokens, 1), self.max_tokens)
                fitting = [r for r in self.idle if r.tokens >= tokens]
                best = min(fitting, key=lambda r: r.tokens) if fitting else None
            if best is not None:
                self.idle.remove(best)
                return best
        return Region(tokens, self.hidden, self.layers, self.dtype)

    def give_back(self, region: Region) -> None:
        if region.closed:  # discarded meanwhile (e.g. an error after it was lent)
            return
        with self.lock:
            if not self.closed:
                self.idle.append(region)
                if len(self.idle) <= self.keep:
                    return
                self.idle.remove(region := min(self.idle, key=lambda r: r.tokens))
        region.close()

    def lend(self, region: Region, n: int, grids) -> WireFeatures:
        """The region's n tokens as an image's tensors; the region comes back when they are freed."""
        features, flat = region.read(n, grids)
        weakref.finalize(flat, self.give_back, region)
        return features

    def close(self) -> None:
        """Free the idle regions; lent ones go when their tensors do."""
        with self.lock:
            self.closed, idle, self.idle = True, self.idle, []
        for region in idle:
            region.close()


class RegionWriter:
    """The encoder side: maps regions named in requests (kept mapped for the next request,
    at most `max_mapped`) and writes visual tokens into them."""

    SWEEP_S = 10.0

    def __init__(self, max_mapped: int = 32):
        self.max_mapped = max_mapped
        self.mapped: OrderedDict[str, tuple[int, mmap.mmap]] = OrderedDict()  # name -> (inode, mapping)
        self.lock = threading.Lock()
        self.swept = time.monotonic()

    def write(self, name: str, piece: VisualFeatures) -> None:
        """piece's [n, H] and [L, n, H], packed, at the start of region `name`."""
        embeds, deepstack = piece.visual_embeds, piece.deepstack_embeds
        n, hidden = embeds.shape
        layers = deepstack.shape[0]
        # Held through the copy: torch.frombuffer does not pin the mapping, so without the lock
        # another thread could unmap it (eviction, sweep) mid-copy.
        with self.lock:
            if time.monotonic() - self.swept > self.SWEEP_S:
                self._sweep()
            region = self._mapping(name, n * token_bytes(hidden, layers, embeds.element_size()))
            if n == 0:
                return
            dst = torch.frombuffer(region, dtype=embeds.dtype, count=n * hidden * (1 + layers))
            dst[:n * hidden].view(n, hidden).copy_(embeds)
            dst[n * hidden:].view(layers, n, hidden).copy_(deepstack)

    def _mapping(self, name: str, size: int) -> mmap.mmap:
        if not name.startswith(PREFIX) or "/" in name or len(name) > 200:
            raise SharedMemoryUnavailable(f"shared-memory region {name!r} is not a transfer region (names start with {PREFIX!r})")
        path = os.path.join(SHM_DIR, name)
        try:
            # O_NOFOLLOW, and fstat of what was opened: a link named like a region must not lead
            # the encoder into writing some other file.
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SharedMemoryUnavailable(f"shared-memory region {name!r} does not exist on the encoder's host "
                             f"(is the language server on another host or IPC namespace?)") from None
        except OSError as e:  # a link, another user's region, ...
            raise SharedMemoryUnavailable(f"shared-memory region {name!r}: {e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                raise SharedMemoryUnavailable(f"shared-memory region {name!r} is not a region this encoder's user made for it")
            if st.st_size < size:  # never grow someone else's object
                raise SharedMemoryUnavailable(f"shared-memory region {name!r} has {st.st_size} bytes, the request needs {size}")
            if st.st_blocks * 512 < st.st_size:  # sparse: writing could SIGBUS on a full /dev/shm
                raise SharedMemoryUnavailable(f"shared-memory region {name!r} is not allocated (sparse)")
            cached = self.mapped.get(name)
            if cached is not None and cached[0] == st.st_ino and len(cached[1]) >= size:
                self.mapped.move_to_end(name)
                return cached[1]
            self._forget(name)
            self._sweep()
            mapping = _map(fd, st.st_size)
        finally:
            os.close(fd)
        self.mapped[name] = (st.st_ino, mapping)
        while len(self.mapped) > self.max_mapped:
            self._forget(next(iter(self.mapped)))
        return mapping

    def _sweep(self) -> None:
        """Let go of regions their owner has unlinked (a new region often replaces one); also
        run every SWEEP_S, so a language server that went away does not pin its memory here."""
        self.swept = time.monotonic()
        for name in [n for n in self.mapped if not os.path.exists(os.path.join(SHM_DIR, n))]:
            self._forget(name)

    def _forget(self, name: str) -> None:
        entry = self.mapped.pop(name, None)
        if entry is not None:
            try:
                entry[1].close()
            except BufferError:  # an exported buffer still alive: unmapped with it
                pass

    def close(self) -> None:
        with self.lock:
            for name in list(self.mapped):
                self._forget(name)
