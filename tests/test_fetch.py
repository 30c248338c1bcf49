"""Pictures by URL for the HTTP face: data URLs decoded; remote ones refused unless allowed, and then
never fetched from private addresses, bounded in size and time, redirects checked hop by hop.

No public host is reachable from this machine, so the fetches that succeed here go to a local server,
with the address check swapped for one that lets loopback through (said where it is done); the real
check is tested on its own and, through a real gateway, refuses the same local server."""
from __future__ import annotations

import asyncio
import base64
import http.server
import threading

import httpx
import pytest

from shelfsight.errors import InvalidArgument
from shelfsight.gateway.fetch import Fetcher, decode_data_url, public
from tests.conftest import running_gateway
from tests.test_gateway import photo

JPEG = photo(720)


@pytest.fixture(scope="module")
def server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/photo.jpg":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()
                self.wfile.write(JPEG)
            elif self.path == "/big":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"x" * (2 << 20))
            elif self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", "/photo.jpg")
                self.end_headers()
            elif self.path == "/slow":
                import time
                time.sleep(3)
                self.send_response(200)
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def loopback_fetcher(**kw) -> Fetcher:
    # the address check swapped: this machine reaches no public host (see the module docstring)
    return Fetcher(True, max_bytes=1 << 20, address_ok=lambda ip: ip == "127.0.0.1", **kw)


def test_only_public_addresses_count_as_public():
    for private in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "::1",
                    "fe80::1", "::ffff:127.0.0.1", "100.64.0.1", "224.0.0.1", "fc00::1"):
        assert not public(private), private
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert public(address), address


def test_fetch_follows_a_redirect_and_bounds_size_and_time(server):
    assert asyncio.run(loopback_fetcher().picture(f"{server}/photo.jpg")) == JPEG
    assert asyncio.run(loopback_fetcher().picture(f"{server}/hop")) == JPEG
    with pytest.raises(InvalidArgument, match="is larger than 1048576 bytes"):
        asyncio.run(loopback_fetcher().picture(f"{server}/big"))
    with pytest.raises(InvalidArgument, match="did not arrive within 1s"):
        asyncio.run(loopback_fetcher(timeout=1.0).picture(f"{server}/slow"))
    with pytest.raises(InvalidArgument, match="answered HTTP 404"):
        asyncio.run(loopback_fetcher().picture(f"{server}/none"))


def test_the_real_check_refuses_private_addresses(server):
    real = Fetcher(True, max_bytes=1 << 20)
    with pytest.raises(InvalidArgument, match="resolves to a private or reserved address"):
        asyncio.run(real.picture(f"{server}/photo.jpg"))
    with pytest.raises(InvalidArgument, match="localhost resolves to a private or reserved address"):
        asyncio.run(real.picture("http://localhost/x.jpg"))
    off = Fetcher(False, max_bytes=1 << 20)
    with pytest.raises(InvalidArgument, match="started without --allow-image-urls"):
        asyncio.run(off.picture(f"{server}/photo.jpg"))


def test_data_urls():
    b64 = base64.b64encode(JPEG).decode()
    assert decode_data_url(f"data:image/jpeg;base64,{b64}", 1 << 20) == JPEG
    assert decode_data_url(b64, 1 << 20) == JPEG  # bare base64, as some clients send
    for url, message in [("data:image/jpeg,raw", "must be base64"), ("data:text/plain;base64,aGk=", "is not a picture"),
                         ("data:image/png;base64,%%%", "not a data URL nor valid base64"),
                         ("data:image/png;base64", "needs a comma")]:
        with pytest.raises(InvalidArgument, match=message):
            decode_data_url(url, 1 << 20)
    with pytest.raises(InvalidArgument, match="larger than 100 bytes"):
        decode_data_url("data:image/jpeg;base64," + "A" * 400, 100)


def test_a_gateway_that_allows_urls_still_refuses_private_ones(triton, server):
    with running_gateway(triton.grpc_url, http_port=0, allow_image_urls=True) as gw:
        model = gw.upstream.model().model_id
        r = httpx.post(f"http://127.0.0.1:{gw.http_port}/v1/chat/completions", timeout=60, json={
            "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"{server}/photo.jpg"}}, {"type": "text", "text": "q"}]}]})
        assert r.status_code == 400 and "private or reserved address (127.0.0.1)" in r.json()["error"]["message"]
