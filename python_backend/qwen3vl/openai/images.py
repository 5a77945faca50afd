"""The bytes of each image a request names: `data:image/...;base64,...` URLs always; http(s)
URLs only of the domains the operator allows (`--allow-image-url-domains`), fetched within a
size and a time limit, without following redirects and without proxy variables. Nothing else
is fetched: a URL of another domain, or any URL when none is allowed, gets a 400 before any
connection is made (a service that fetches whatever a client names is an SSRF hole)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx2

from .. import data_url
from .errors import invalid
from .messages import ImageRef


@dataclass(frozen=True)
class ImagePolicy:
    # `example.com` allows that host only; `*.example.com` its subdomains (not itself).
    allowed_domains: tuple[str, ...] = ()
    max_bytes: int = 20 * 2**20
    fetch_timeout_s: float = 10.0


def domain_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """The image inside a data URL (qwen3vl.data_url's rules, the encoder's too), at most
    `max_bytes` long. Raises APIError (400) naming `param`."""
    try:
        return data_url.decode_data_url(url, param, "image", max_bytes)
    except data_url.DataURLError as e:
        raise invalid(str(e), param, code="image_too_large" if e.too_large else "invalid_value") from None


class ImageLoader:
    def __init__(self, policy: ImagePolicy):
        self.policy = policy
        self._client: httpx2.AsyncClient | None = None

    async def load_all(self, refs: list[ImageRef]) -> list[bytes]:
        """Every image's bytes, in order (fetches run concurrently). Raises APIError (400)."""
        return list(await asyncio.gather(*(self.load(ref) for ref in refs)))

    async def load(self, ref: ImageRef) -> bytes:
        url, param = ref.url, ref.param
        if data_url.is_data_url(url):
            return decode_data_url(url, param, self.policy.max_bytes)
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise invalid(f"{param}: an image URL must be a data URL (data:image/png;base64,...) or an http(s) URL",
                          param)
        if not self.policy.allowed_domains:
            raise invalid(f"{param}: this server does not fetch image URLs; send the image as a data URL "
                          "(data:image/png;base64,...), or start the server with --allow-image-url-domains",
                          param, code="image_url_not_allowed")
        if not domain_allowed(parts.hostname, self.policy.allowed_domains):
            raise invalid(f"{param}: images are not fetched from {parts.hostname}; allowed: "
                          f"{', '.join(self.policy.allowed_domains)}", param, code="image_url_not_allowed")
        try:
            async with asyncio.timeout(self.policy.fetch_timeout_s):
                return await self._fetch(url, param)
        except TimeoutError:
            raise invalid(f"{param}: the image was not fetched within {self.policy.fetch_timeout_s:g} s", param,
                          code="image_fetch_failed") from None
        except httpx2.HTTPError as e:
            raise invalid(f"{param}: could not fetch the image: {type(e).__name__}: {e}", param,
                          code="image_fetch_failed") from None

    async def _fetch(self, url: str, param: str) -> bytes:
        if self._client is None:
            self._client = httpx2.AsyncClient(follow_redirects=False, trust_env=False,
                                              timeout=self.policy.fetch_timeout_s)
        limit = self.policy.max_bytes
        too_large = invalid(f"{param}: the image is larger than this server's limit of {limit} bytes", param,
                            code="image_too_large")
        async with self._client.stream("GET", url) as response:
            if response.status_code != 200:
                kind = "a redirect (not followed)" if response.is_redirect else f"HTTP {response.status_code}"
                raise invalid(f"{param}: fetching the image gave {kind}", param, code="image_fetch_failed")
            if int(response.headers.get("content-length") or 0) > limit:
                raise too_large
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise too_large
        return bytes(body)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
