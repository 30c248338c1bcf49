"""Pictures named by URL in an OpenAI request: `data:` URLs (and bare base64) decoded; http(s) URLs
fetched only when the gateway allows it (`--allow-image-urls`), and then safely:

- never from a private, loopback, link-local, multicast or reserved address (the gateway must not be a
  way into the network it sits in: a cloud's metadata service at 169.254.169.254, a database on 10.x):
  the host is resolved once, every address it resolves to must be public, and the connection goes to
  that checked address (a DNS answer that changes between the check and the connection cannot
  redirect it), with the original name as Host and TLS server name;
- redirects are followed by hand (at most MAX_REDIRECTS), each hop checked the same way;
- within a time limit for the whole fetch and a size limit counted while reading (a server that
  claims a small Content-Length and sends more is cut off).
Failures are InvalidArgument naming the URL and why (the face answers 400).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from typing import Callable
from urllib.parse import urljoin, urlsplit

from shelfsight.errors import InvalidArgument

MAX_REDIRECTS = 3
DATA_PREFIX = "data:"


def public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """data:[<type>][;base64],<data> (or bare base64) -> bytes."""
    if url.startswith(DATA_PREFIX):
        head, sep, body = url[len(DATA_PREFIX):].partition(",")
        if not sep:
            raise InvalidArgument("image_url: a data URL needs a comma before its data")
        if not head.endswith(";base64"):
            raise InvalidArgument("image_url: a data URL must be base64 (data:image/jpeg;base64,...)")
        kind = head[:-len(";base64")]
        if kind and not kind.startswith("image/"):
            raise InvalidArgument(f"image_url: a data URL of type {kind!r} is not a picture")
    else:
        body = url
    if len(body) > (max_bytes + 2) // 3 * 4 + 4:
        raise InvalidArgument(f"image_url: the picture is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("image_url: not a data URL nor valid base64 (remote URLs start with http:// "
                              "or https://)") from None


class Fetcher:
    def __init__(self, allowed: bool, max_bytes: int, timeout: float = 10.0,
                 address_ok: Callable[[str], bool] = public,
                 resolve: Callable[[str, int], list[str]] | None = None):
        self.allowed, self.max_bytes, self.timeout = allowed, max_bytes, timeout
        self.address_ok = address_ok
        self.resolve = resolve or _resolve

    async def picture(self, url: str) -> bytes:
        if not url.startswith(("http://", "https://")):
            return decode_data_url(url, self.max_bytes)
        if not self.allowed:
            raise InvalidArgument("image_url: remote URLs are not fetched by this gateway (it was started without "
                                  "--allow-image-urls); send the picture as a data: URL")
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch(url)
        except TimeoutError:
            raise InvalidArgument(f"image_url: {url} did not arrive within {self.timeout:g}s") from None

    async def _fetch(self, url: str) -> bytes:
        import httpx

        async with httpx.AsyncClient(follow_redirects=False, timeout=self.timeout, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                parts = urlsplit(url)
                host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
                addresses = await asyncio.to_thread(self.resolve, host, port)
                if not addresses:
                    raise InvalidArgument(f"image_url: {host} does not resolve")
                bad = [a for a in addresses if not self.address_ok(a)]
                if bad:
                    raise InvalidArgument(f"image_url: {host} resolves to a private or reserved address ({bad[0]}); "
                                          "pictures are fetched only from public addresses")
                ip = addresses[0]
                target = parts._replace(netloc=f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}").geturl()
                request = client.build_request("GET", target, headers={"Host": parts.netloc, "Accept": "image/*"},
                                               extensions={"sni_hostname": host} if parts.scheme == "https" else {})
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise InvalidArgument(f"image_url: {url} answered HTTP {response.status_code}")
                    body = bytearray()
                    async for piece in response.aiter_bytes():
                        body += piece
                        if len(body) > self.max_bytes:
                            raise InvalidArgument(f"image_url: {url} is larger than {self.max_bytes} bytes")
                    return bytes(body)
                finally:
                    await response.aclose()
            raise InvalidArgument(f"image_url: more than {MAX_REDIRECTS} redirects")


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InvalidArgument(f"image_url: {host} does not resolve ({e})") from None
    return list(dict.fromkeys(info[4][0] for info in infos))
