"""A server started with the URL options on (fetching from 127.0.0.1 and file: URLs), and how it shuts down on
SIGTERM: requests in flight finish if they can within --shutdown-timeout and otherwise end with a final error event
and [DONE] (streams, after the tokens so far) or a 503 (non-streamed); new connections are refused; the process
exits."""

from __future__ import annotations

import base64
import http.server
import json
import signal
import threading
import time

import httpx
import pytest

from server_process import KEY, MODEL, Server, png_data_url, user

SHUTDOWN_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def server(tiny_v2, tmp_path_factory):
    server = Server(tiny_v2, tmp_path_factory.mktemp("server") / "server.log", "--allow-private-urls",
                    "--allow-file-urls", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--max-tokens", "4000")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def image():
    """(data URL, bytes) of one PNG, also served over HTTP on 127.0.0.1 at /cat.png by `web`."""
    url = png_data_url(90, 60, seed=11)
    return url, base64.b64decode(url.partition(",")[2])


@pytest.fixture(scope="module")
def web(image):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/cat.png":
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(image[1])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def answer(server, url: str) -> dict:
    response = server.chat(messages=user("What is this?", url), max_tokens=8)
    assert response.status_code == 200, response.text
    return response.json()


def test_http_and_file_urls_give_the_data_url_answer(server, image, web, tmp_path):
    expected = answer(server, image[0])
    path = tmp_path / "cat.png"
    path.write_bytes(image[1])
    for url in [f"{web}/cat.png", f"http://localhost:{web.rsplit(':', 1)[1]}/cat.png", path.as_uri()]:
        got = answer(server, url)
        cached = got["usage"].pop("prompt_tokens_details")["cached_tokens"]  # the same pixels: a prefix cache hit
        assert 0 < cached < got["usage"]["prompt_tokens"]
        expected["usage"].pop("prompt_tokens_details", None)
        assert got["choices"] == expected["choices"] and got["usage"] == expected["usage"]
    response = server.chat(messages=user("What is this?", f"{web}/missing.png"))
    assert response.status_code == 400 and "HTTP 404" in response.json()["error"]["message"]


class Stream(threading.Thread):
    """Reads one streamed answer in the background: its events, and whether it ended with [DONE]."""

    def __init__(self, server, max_tokens: int):
        super().__init__(daemon=True)
        self.body = {"model": MODEL, "messages": user("Tell me a story"), "max_tokens": max_tokens, "stream": True}
        self.url, self.events, self.error = server.url, [], None
        self.started = threading.Event()
        self.start()

    def run(self):
        headers = {"Authorization": f"Bearer {KEY}"}
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=self.body, headers=headers,
                              timeout=30) as response:
                for line in response.iter_lines():
                    if line:
                        self.events.append(line)
                        if len(self.events) == 3:
                            self.started.set()
        except httpx.HTTPError as e:  # the long answer is cut off
            self.error = e
        self.started.set()

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "data: [DONE]"


def test_sigterm_finishes_short_requests_and_ends_long_ones_with_an_error(server):
    short, long = Stream(server, 100), Stream(server, 4000)  # 100 tokens take well under a second, 4000 several
    plain = {}

    def non_streamed():
        body = {"model": MODEL, "messages": user("Tell me a story"), "max_tokens": 4000}
        plain["response"] = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30,
                                       headers={"Authorization": f"Bearer {KEY}"})

    waiter = threading.Thread(target=non_streamed, daemon=True)
    waiter.start()
    assert short.started.wait(30) and long.started.wait(30)
    busy = time.monotonic()
    while server.health()["running"] < 3 and time.monotonic() - busy < 30:
        time.sleep(0.05)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    short.join(30)
    assert short.done and short.error is None
    finish = json.loads(short.events[-2][6:])
    assert finish["choices"][0]["finish_reason"] == "length"
    content = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in short.events[1:-2]]
    assert len(content) >= 50  # every piece of the answer was sent

    with pytest.raises(httpx.ConnectError):  # no new connections while the server drains
        httpx.get(f"{server.url}/health", timeout=5)

    assert server.process.wait(SHUTDOWN_TIMEOUT + 20) == -signal.SIGTERM  # uvicorn re-raises the signal it handled
    long.join(10)
    waiter.join(10)
    # The long stream: its tokens so far, then an error event saying the server is shutting down, then [DONE].
    assert long.done and long.error is None
    error = json.loads(long.events[-2][6:])["error"]
    assert (error["type"], error["code"]) == ("server_error", "server_shutting_down")
    assert "shutting down" in error["message"]
    assert sum("content" in e for e in long.events[1:-2]) > 10
    # The non-streamed one: a 503 in OpenAI's format.
    response = plain["response"]
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert time.monotonic() - started >= SHUTDOWN_TIMEOUT - 0.6  # they had their time to finish
