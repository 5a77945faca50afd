"""The bytes of each image (and video) a request names: `data:image/...;base64,...` (and
`data:video/...`) URLs always; http(s) URLs only of the domains the operator allows
(`--allow-image-url-domains`, for videos too), fetched within a size and a time limit, without following redirects and without proxy variables. Nothing else
is fetched: a URL of another domain, or any URL when none is allowed, gets a 400 before any
connection is made (a service that fetches whatever a client names is an SSRF hole)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx2

from .. import data_url
from .errors import invalid
from .messages import ImageRef, VideoRef


@dataclass(frozen=True)
class ImagePolicy:
    # `example.com` allows that host only; `*.example.com` its subdomains (not itself).
    # The same hosts for image and video URLs (`video_url` parts), fetched by the same rules.
    allowed_domains: tuple[str, ...] = ()
    max_bytes: int = 20 * 2**20
    fetch_timeout_s: float = 10.0
    max_video_bytes: int = 256 * 2**20  # the model's own max_video_bytes default

    def limit(self, kind: str) -> int:
        return self.max_video_bytes if kind == "video" else self.max_bytes


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


def decode_data_url(url: str, param: str, max_bytes: int, kind: str = "image") -> bytes:
    """The image (or video, `kind`) inside a data URL (qwen3vl.data_url's rules, the encoder's
    too), at most `max_bytes` long. Raises APIError (400) naming `param`."""
    try:
        return data_url.decode_data_url(url, param, kind, max_bytes)
    except data_url.DataURLError as e:
        raise invalid(str(e), param, code=f"{kind}_too_large" if e.too_large else "invalid_value") from None


class ImageLoader:
    """Loads the files `image_url` and `video_url` parts name (`kind` "image" or "video")."""

    def __init__(self, policy: ImagePolicy):
        self.policy = policy
        self._client: httpx2.AsyncClient | None = None

    async def load_all(self, refs: list[ImageRef] | list[VideoRef], kind: str = "image") -> list[bytes]:
        """Every file's bytes, in order (fetches run concurrently). Raises APIError (400)."""
        return list(await asyncio.gather(*(self.load(ref, kind) for ref in refs)))

    async def load(self, ref: ImageRef | VideoRef, kind: str = "image") -> bytes:
        url, param = ref.url, ref.param
        a = "an" if kind[0] in "aeiou" else "a"
        if data_url.is_data_url(url):
            return decode_data_url(url, param, self.policy.limit(kind), kind)
        parts = urlsplit(url)
        example = "data:image/png;base64" if kind == "image" else "data:video/mp4;base64"
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise invalid(f"{param}: {a} {kind} URL must be a data URL ({example},...) or an http(s) URL",
                          param)
        if not self.policy.allowed_domains:
            raise invalid(f"{param}: this server does not fetch {kind} URLs; send the {kind} as a data URL "
                          f"({example},...), or start the server with --allow-image-url-domains",
                          param, code=f"{kind}_url_not_allowed")
        if not domain_allowed(parts.hostname, self.policy.allowed_domains):
            raise invalid(f"{param}: {kind}s are not fetched from {parts.hostname}; allowed: "
                          f"{', '.join(self.policy.allowed_domains)}", param, code=f"{kind}_url_not_allowed")
        try:
            async with asyncio.timeout(self.policy.fetch_timeout_s):
                return await self._fetch(url, param, kind)
        except TimeoutError:
            raise invalid(f"{param}: the {kind} was not fetched within {self.policy.fetch_timeout_s:g} s", param,
                          code=f"{kind}_fetch_failed") from None
        except httpx2.HTTPError as e:
            raise invalid(f"{param}: could not fetch the {kind}: {type(e).__name__}: {e}", param,
                          code=f"{kind}_fetch_failed") from None

    async def _fetch(self, url: str, param: str, kind: str) -> bytes:
        if self._client is None:
            self._client = httpx2.AsyncClient(follow_redirects=False, trust_env=False,
                                              timeout=self.policy.fetch_timeout_s)
        limit = self.policy.limit(kind)
        too_large = invalid(f"{param}: the {kind} is larger than this server's limit of {limit} bytes", param,
                            code=f"{kind}_too_large")
        async with self._client.stream("GET", url) as response:
            if response.status_code != 200:
                kind_of = "a redirect (not followed)" if response.is_redirect else f"HTTP {response.status_code}"
                raise invalid(f"{param}: fetching the {kind} gave {kind_of}", param, code=f"{kind}_fetch_failed")
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
