"""RemoteEncoder: the language server's `qwen3_encoder` (remote mode) fetches the E->L tensors
from encoder servers instead of running the vision tower; same interface as VisionEncoder."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from .. import contract
from ..errors import InvalidInput
from ..features import VisualFeatures
from ..model.config import ModelConfig
from ..settings import ServingConfig
from . import shm
from .fetch import MediaFetcher, TransferStats
from .routing import HashRing
from .stream import EncoderClients


class RemoteEncoder:
    """`encode(per_request)` like VisionEncoder's, served by the encoder servers of
    `settings.encoder_urls` (gRPC HOST:PORT): every image fetched in parallel on `workers` threads."""

    def __init__(self, config: ModelConfig, settings: ServingConfig, workers: int = 8):
        urls = settings.encoder_url_list
        if not urls:
            raise InvalidInput("remote encoder mode needs at least one encoder URL (qwen3vl-serve --encoder-url)")
        self.config = config
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="qwen3vl-fetch")
        self.clients = EncoderClients()
        # Same-host encoders write the bulk straight into a shared-memory region of ours (shm.py).
        self.regions = shm.RegionPool(config.visual_hidden_size, config.deepstack_layers, config.dtype,
                                      max_bytes=settings.mib(settings.transfer_shm_region_mib), keep=workers)
        wire_dtype = contract.TRITON_DTYPE[str(config.dtype).removeprefix("torch.")].removeprefix("TYPE_")
        self.fetcher = MediaFetcher(HashRing(urls), config, settings, self.clients, self.regions, wire_dtype)
        self.last = TransferStats()

    def encode(self, per_request: list[list[bytes]]) -> list[VisualFeatures | Exception]:
        """Each request's features, or the first error of its images (the others go on)."""
        start = time.perf_counter()
        stats = TransferStats(requests=len(per_request), images=sum(map(len, per_request)))
        futures = [[self.pool.submit(self.fetcher.fetch, image, i) for i, image in enumerate(req)]
                   for req in per_request]
        results: list[VisualFeatures | Exception] = []
        for req in futures:
            parts, error = [], None
            for f in req:
                try:
                    features, fetch_stats = f.result()
                    parts.append(features)
                    stats.add(fetch_stats)
                except Exception as e:  # noqa: BLE001 - the request fails, the batch goes on
                    error = error or e
            results.append(error if error else VisualFeatures.concat(parts, self.config))
        stats.seconds = time.perf_counter() - start
        self.last = stats
        return results

    def close(self) -> None:
        """Free the shared-memory regions and close the gRPC clients."""
        self.regions.close()
        self.clients.close()
        self.pool.shutdown(wait=False, cancel_futures=True)  # queued fetches: nobody waits for them
