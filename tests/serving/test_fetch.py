"""Fetching request URLs safely (in process, against a local web server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import pytest

from smolvlm.serving import fetch
from smolvlm.serving.fetch import Fetcher, is_public
from smolvlm.serving.limits import Limits
from smolvlm.serving.protocol import APIError

BODY = b"\x89PNG not really, but bytes"


class Handler(http.server.BaseHTTPRequestHandler):
    """/data: BODY; /big: 2000 bytes (no Content-Length with ?chunked); /slow: one byte a second;
    /redirect?to=URL: 302 there; /missing: 404. Every request is logged in `paths`."""

    paths: list[str] = []
    hosts: list[str] = []

    def do_GET(self):
        Handler.paths.append(self.path)
        Handler.hosts.append(self.headers["Host"])
        path, _, query = self.path.partition("?")
        if path == "/data":
            self._send(BODY, headers={"Content-Length": str(len(BODY))})
        elif path == "/big":
            self._send(b"x" * 2000, headers={} if query == "chunked" else {"Content-Length": "2000"})
        elif path == "/slow":
            self.send_response(200)
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query.removeprefix("to="))
            self.end_headers()
        else:
            self.send_error(404)

    def _send(self, body: bytes, headers: dict):
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(autouse=True)
def clear_log():
    Handler.paths.clear()
    Handler.hosts.clear()


def get(url: str, **limits) -> bytes:
    async def run():
        fetcher = Fetcher(Limits(**limits))
        try:
            return await fetcher.fetch(url, "image")
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def refused(url: str, match: str, **limits) -> APIError:
    with pytest.raises(APIError, match=match) as e:
        get(url, **limits)
    assert e.value.status == 400 and e.value.param == "image"
    return e.value


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("1.1.1.1", True), ("2001:4860:4860::8888", True),
    ("127.0.0.1", False), ("127.1.2.3", False), ("::1", False), ("0.0.0.0", False), ("::", False),
    ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False), ("100.64.0.1", False), ("fc00::1", False),
    ("169.254.169.254", False), ("fe80::1", False), ("fe80::1%eth0", False),
    ("224.0.0.1", False), ("ff02::1", False), ("240.0.0.1", False), ("255.255.255.255", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True),
])  # fmt: skip
def test_which_addresses_are_public(address, public):
    assert is_public(address) is public


def test_private_addresses_are_refused_before_connecting(web):
    port = web.rsplit(":", 1)[1]
    for url in [f"{web}/data", f"http://localhost:{port}/data", f"http://[::1]:{port}/data"]:
        error = refused(url, "not a public address", allow_private_urls=False)
        assert error.code == "url_not_allowed" and "--allow-private-urls" in error.message
    assert Handler.paths == []


def test_a_host_with_any_private_address_is_refused(monkeypatch):
    async def resolve(host, port):
        assert (host, port) == ("mixed.example", 443)
        return ["93.184.216.34", "10.1.2.3"]

    monkeypatch.setattr(fetch, "resolve", resolve)
    refused("https://mixed.example/cat.png", "resolves to 10.1.2.3, which is not a public address")


def test_redirects_are_checked_hop_by_hop(web, monkeypatch):
    # Pretend 127.0.0.1 is public, so the first hop is fetched and the guard must stop the second one.
    monkeypatch.setattr(fetch, "is_public", lambda address: address == "127.0.0.1")
    assert get(f"{web}/redirect?to=/data") == BODY
    refused(f"{web}/redirect?to=http://127.0.0.2:1/data", "'http://127.0.0.2:1/data' resolves to 127.0.0.2")
    refused(f"{web}/redirect?to=file:///etc/passwd", "a redirect led to 'file:.*only http\\(s\\) URLs are fetched")
    refused(f"{web}/redirect?to={web}/redirect?to={web}/redirect?to={web}/redirect?to={web}/redirect?to={web}/redirect"
            f"?to={web}/redirect?to=/data", "more than 5 redirects")
    assert all(p.startswith(("/redirect", "/data")) for p in Handler.paths)


def test_the_connection_goes_to_the_checked_address(web, monkeypatch):
    """Nothing resolves the host again after the check (DNS rebinding): the system resolver doesn't know this name,
    so the fetch only works if it connects to the address checked; the Host header stays the URL's."""
    async def resolve(host, port):
        assert host == "rebind.invalid"
        return ["127.0.0.1"]

    monkeypatch.setattr(fetch, "resolve", resolve)
    monkeypatch.setattr(fetch, "is_public", lambda address: address == "127.0.0.1")
    port = web.rsplit(":", 1)[1]
    assert get(f"http://rebind.invalid:{port}/data") == BODY
    assert Handler.hosts == [f"rebind.invalid:{port}"]


def test_allowed_private_urls_and_their_errors(web):
    assert get(f"{web}/data", allow_private_urls=True) == BODY
    assert get(f"{web}/redirect?to=/data", allow_private_urls=True) == BODY
    refused(f"{web}/missing", "HTTP 404", allow_private_urls=True)
    for query in ["", "?chunked"]:  # announced or only counted while reading
        error = refused(f"{web}/big{query}", "this server takes at most 1000 .*--max-media-mb", allow_private_urls=True,
                        max_media_bytes=1000)
        assert error.code == "media_too_large"
    started = time.monotonic()
    refused(f"{web}/slow", r"took longer than 0.5 s \(--fetch-timeout\)", allow_private_urls=True, fetch_timeout=0.5)
    assert time.monotonic() - started < 2  # the total deadline, though each byte came within the per-read timeout
    refused("http://127.0.0.1:1/data", "fetching .* failed: ConnectError", allow_private_urls=True)


def test_data_urls():
    assert get("data:image/png;base64,aGVs bG8=\n") == b"hello"
    refused("data:image/png,hello", "must be base64-encoded")
    refused("data:image/png;base64,!!!!", "not valid base64")
    error = refused("data:image/png;base64," + "A" * 2000, "at most 1000 bytes", max_media_bytes=1000)
    assert error.code == "media_too_large"


def test_file_urls_only_when_allowed(tmp_path):
    path = tmp_path / "cat image.png"
    path.write_bytes(BODY)
    url = path.as_uri()
    refused(url, "file: URLs are not allowed on this server \\(start it with --allow-file-urls\\)")
    assert get(url, allow_file_urls=True) == BODY
    assert get(f"file://localhost{path}", allow_file_urls=True) == BODY
    refused((tmp_path / "missing.png").as_uri(), "No such file", allow_file_urls=True)
    refused(f"file://otherhost{path}", "must name a local file", allow_file_urls=True)
    refused(url, "at most 10 ", allow_file_urls=True, max_media_bytes=10)


@pytest.mark.parametrize("url", ["/etc/passwd", "cat.png", "ftp://example.com/x.png", "gopher://x", ""])
def test_other_sources_are_refused(url):
    refused(url, "expected an http\\(s\\) URL or a data: URL")
