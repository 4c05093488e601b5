"""Fetch the images and videos a request points at, without letting a request reach what the server can reach.

- http(s): the host is resolved here and every address it resolves to must be public (not loopback, private,
  link-local, multicast, reserved...); the connection then goes to the checked address (the Host header and TLS
  name stay the URL's), so a DNS answer that changes between the check and the connection can't sneak past it.
  Redirects are followed by hand, each hop checked the same way. One total deadline covers the whole fetch.
- data: URLs (base64) are decoded in a worker thread.
- file: URLs are refused unless the server allows them; other schemes are always refused.
Every fetched or decoded payload is capped in size.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import re
import socket
from urllib.parse import unquote, urlsplit

import httpx

from .limits import Limits
from .protocol import APIError

MAX_REDIRECTS = 5
HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (IPv4 and IPv6), in the resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_public(address: str) -> bool:
    """Whether an address is on the public internet (an IPv4-mapped IPv6 address counts as its IPv4 one)."""
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class Fetcher:
    """Fetches URLs for requests. `where` (a request path like messages[0].content[1].image_url.url) names the URL
    in errors, which are APIErrors with status 400."""

    def __init__(self, limits: Limits):
        self.limits = limits
        # trust_env=False: no proxy from the environment, which would resolve (and reach) hosts on our behalf
        self.client = httpx.AsyncClient(timeout=limits.fetch_timeout, follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        await self.client.aclose()

    def check(self, url: str, where: str) -> str:
        """The URL's scheme, once the URL is one this server may fetch and (http) one it can parse; no I/O."""
        scheme = url.partition(":")[0].lower() if ":" in url else ""
        if scheme in ("http", "https"):
            self._parse(url, where)
        elif scheme == "file" and not self.limits.allow_file_urls:
            raise self._error(where, "file: URLs are not allowed on this server (start it with --allow-file-urls)")
        elif scheme not in ("data", "file"):
            raise self._error(where, f"expected an http(s) URL or a data: URL (data:image/png;base64,...), got "
                              f"{url!r:.80}")
        return scheme

    async def fetch(self, url: str, where: str) -> bytes:
        scheme = self.check(url, where)
        if scheme == "data":
            return await asyncio.to_thread(self._data, url, where)
        if scheme == "file":
            return await self._file(url, where)
        try:
            async with asyncio.timeout(self.limits.fetch_timeout):
                return await self._http(url, where)
        except TimeoutError:
            raise self._error(where, f"fetching {url!r} took longer than {self.limits.fetch_timeout:g} s "
                              "(--fetch-timeout)") from None

    def _parse(self, url: str, where: str) -> httpx.URL:
        """An http(s) URL as httpx reads it, with a host and a valid port (400 invalid_url otherwise)."""
        try:
            parsed = httpx.URL(url)
            if parsed.scheme not in ("http", "https"):  # only a redirect gets here with another scheme
                raise self._error(where, f"a redirect led to {url!r}; only http(s) URLs are fetched")
            if not parsed.host:
                raise ValueError("expected http(s)://host[:port]/path")
            if parsed.port is not None and not 0 < parsed.port < 65536:
                raise ValueError(f"port {parsed.port} is not in 1..65535")
            host = parsed.raw_host.decode("ascii")  # IDNA-encoded
            if ":" in host:
                ipaddress.ip_address(host.split("%")[0])  # an IPv6 literal
            elif not HOSTNAME.fullmatch(host):
                raise ValueError(f"{parsed.host!r} is not a host name or an IP address")
        except (httpx.InvalidURL, ValueError, TypeError) as e:
            raise self._error(where, f"{url!r:.200} is not a valid URL ({e})", "invalid_url") from None
        return parsed

    def _error(self, where: str, message: str, code: str | None = None) -> APIError:
        return APIError(f"{where}: {message}", 400, where, code)

    def _too_large(self, where: str, size: int | str) -> APIError:
        return self._error(where, f"the file is {size} bytes; this server takes at most "
                           f"{self.limits.max_media_bytes} bytes (--max-media-mb)", "media_too_large")

    def _data(self, url: str, where: str) -> bytes:
        header, comma, payload = url.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise self._error(where, "a data: URL must be base64-encoded: data:<type>;base64,<data>")
        payload = "".join(payload.split())
        if len(payload) * 3 // 4 > self.limits.max_media_bytes:
            raise self._too_large(where, f"about {len(payload) * 3 // 4}")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise self._error(where, "the data: URL's payload is not valid base64") from None

    async def _file(self, url: str, where: str) -> bytes:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise self._error(where, f"a file: URL must name a local file (file:///path), got host {parts.netloc!r}")
        path = unquote(parts.path)

        def read() -> bytes:
            try:
                if os.path.getsize(path) > self.limits.max_media_bytes:
                    raise self._too_large(where, os.path.getsize(path))
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise self._error(where, f"can't read {path!r}: {e.strerror or e}") from None

        return await asyncio.to_thread(read)

    async def _http(self, url: str, where: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            response = await self._send(self._parse(url, where), where)
            try:
                if response.is_redirect:
                    try:
                        url = str(httpx.URL(url).join(response.headers["location"]))
                    except (httpx.InvalidURL, ValueError, TypeError):
                        raise self._error(where, f"fetching {url!r}: the redirect's Location "
                                          f"{response.headers['location']!r:.200} is not a valid URL", "invalid_url")
                    continue
                if response.status_code >= 400:
                    raise self._error(where, f"fetching {url!r} failed: HTTP {response.status_code} "
                                      f"{response.reason_phrase}")
                length = response.headers.get("content-length", "")
                if length.isdigit() and int(length) > self.limits.max_media_bytes:
                    raise self._too_large(where, int(length))
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.limits.max_media_bytes:
                        raise self._too_large(where, f"over {self.limits.max_media_bytes}")
                return bytes(data)
            except httpx.HTTPError as e:
                raise self._error(where, f"fetching {url!r} failed: {type(e).__name__}: {e}") from None
            finally:
                await response.aclose()
        raise self._error(where, f"fetching {url!r}: more than {MAX_REDIRECTS} redirects")

    async def _send(self, url: httpx.URL, where: str) -> httpx.Response:
        """GET `url` (streamed) from a checked address of its host."""
        request = self.client.build_request("GET", url)
        if not self.limits.allow_private_urls:
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                addresses = await resolve(url.host, port)
            except (OSError, UnicodeError) as e:  # UnicodeError: a name the IDNA codec refuses
                raise self._error(where, f"can't resolve the host {url.host!r}: {e}") from None
            blocked = [a for a in addresses if not is_public(a)]
            if blocked or not addresses:
                raise self._error(where, f"{str(url)!r} resolves to {blocked[0] if blocked else 'no address'}, "
                                  "which is not a public address; the server doesn't fetch loopback, private or "
                                  "link-local addresses (start it with --allow-private-urls)", "url_not_allowed")
            # Connect to the checked address; the Host header (set from the URL above) and the TLS name stay.
            request.url = url.copy_with(host=addresses[0])
            if url.scheme == "https":
                request.extensions["sni_hostname"] = url.host
        try:
            return await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise self._error(where, f"fetching {str(url)!r} failed: {type(e).__name__}: {e}") from None
