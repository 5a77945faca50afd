"""Which encoder serves an image: consistent hashing on the image's content, so repeats hit a
warm cache, and adding or losing an encoder moves only its share; dead ones are skipped."""

from __future__ import annotations

import bisect
import hashlib
import time


class HashRing:
    """Consistent hashing over encoder URLs (virtual nodes), so one image always goes to the
    same encoder and adding or losing one moves only its share of images."""

    def __init__(self, urls: list[str], replicas: int = 64):
        self.urls = list(dict.fromkeys(urls))
        points = sorted((self._hash(f"{url}#{i}"), url) for url in self.urls for i in range(replicas))
        self.hashes = [h for h, _ in points]
        self.owners = [u for _, u in points]

    @staticmethod
    def _hash(text: str) -> int:
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")

    def order(self, key: str) -> list[str]:
        """All URLs, the key's owner first, then the ring's successors."""
        out: list[str] = []
        i = bisect.bisect(self.hashes, self._hash(key))
        for j in range(len(self.owners)):
            url = self.owners[(i + j) % len(self.owners)]
            if url not in out:
                out.append(url)
                if len(out) == len(self.urls):
                    break
        return out


def is_live(url: str, model: str = "qwen3_encoder") -> bool:
    """The server at `url` (gRPC HOST:PORT) answers and has `model` ready (1 s timeouts)."""
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            return client.is_server_ready(client_timeout=1.0) and client.is_model_ready(model, client_timeout=1.0)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - unreachable is not live
        return False


def next_encoder(failed: str, order: list[str], deadline: float, same_encoder_wait_s: float) -> str | None:
    """After `failed` broke: itself if it is back within `same_encoder_wait_s` (its cache is
    warm), else the first live one of `order`; None when none is live before `deadline`
    (time.monotonic())."""
    wait_until = min(deadline, time.monotonic() + same_encoder_wait_s)
    while True:
        if is_live(failed):
            return failed
        if time.monotonic() >= wait_until:
            break
        time.sleep(0.1)
    while time.monotonic() < deadline:
        for url in order:
            if is_live(url):
                return url
        time.sleep(0.2)
    return None
