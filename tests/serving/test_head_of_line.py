"""Head-of-line blocking: a stream that is running keeps getting its tokens while heavy requests (a body near the
size limit, many large images, a prompt that nearly fills the context) are read, parsed, decoded and prefilled.

Times on a loaded machine are noisy, so nothing is compared with a fixed number of seconds: the longest wait
between two chunks of the running stream while the heavy requests are handled must stay a small part of the time
those requests take (if one of them held the event loop, the engine loop or the interpreter for its whole
preparation or prefill, the stream would wait about that long), and a text request sent meanwhile must be answered
well before them."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import psutil
import pytest

from server_process import KEY, MODEL, Server, png_data_url, user

CONTEXT = 4096


@pytest.fixture(scope="module")
def roomy(tiny_v2, tmp_path_factory):
    """A server whose limits let heavy requests in (the shared one refuses them early)."""
    server = Server(tiny_v2, tmp_path_factory.mktemp("hol") / "server.log", "--max-batch", "8", "--max-model-len",
                    str(CONTEXT), "--max-tokens", "3000", "--max-images", "16", "--max-image-pixels", "4000000",
                    "--max-body-mb", "64", "--cache-mb", "0")
    yield server
    server.stop()


def heavy_bodies() -> dict[str, bytes]:
    images = [png_data_url(1200, 1200, seed=i) for i in range(6)]
    return {
        "huge body": json.dumps({"model": MODEL, "messages": user("Hi"), "max_tokens": 1,
                                 "padding": [{"key": i, "value": "x" * 40} for i in range(400_000)]}).encode(),
        "many images": json.dumps({"model": MODEL, "messages": user("Describe them", *images), "max_tokens": 1})
        .encode(),
        "long prompt": json.dumps({"model": MODEL, "messages": user("word " * (CONTEXT - 200)), "max_tokens": 1})
        .encode(),
    }


def stream_chunks(server: Server, times: list[float], stop: threading.Event) -> None:
    body = {"model": MODEL, "messages": user("Tell me a long story"), "max_tokens": 3000, "stream": True,
            "temperature": 1.0, "seed": 3}  # sampled: the tiny model's greedy answer may end early
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                times.append(time.monotonic())
            if stop.is_set():
                return


def max_gap(times: list[float], start: float, end: float) -> float:
    inside = [t for t in times if start <= t <= end]
    return max(b - a for a, b in zip(inside, inside[1:]))


@pytest.mark.parametrize("kind", ["huge body", "many images", "long prompt"])
def test_a_running_stream_keeps_flowing_while_heavy_requests_are_handled(roomy, kind):
    body = heavy_bodies()[kind]
    times: list[float] = []
    stop = threading.Event()
    streamer = threading.Thread(target=stream_chunks, args=(roomy, times, stop))
    streamer.start()
    try:
        while len(times) < 50:  # the stream is running
            time.sleep(0.01)
        alone_start = time.monotonic()
        time.sleep(0.5)
        alone = max_gap(times, alone_start, time.monotonic())

        statuses, started = [], time.monotonic()
        heavy = [threading.Thread(target=lambda: statuses.append(roomy.http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}).status_code))
            for _ in range(3)]
        for t in heavy:
            t.start()
        time.sleep(0.05)
        sent = time.monotonic()
        light = roomy.chat(messages=user("Hi"), max_tokens=1)
        light_s = time.monotonic() - sent
        for t in heavy:
            t.join()
        heavy_s = time.monotonic() - started
        gap = max_gap(times, started, time.monotonic())
    finally:
        stop.set()
        streamer.join()
    print(f"{kind}: heavy {heavy_s:.2f} s, light {light_s:.3f} s, longest gap {gap:.3f} s (alone {alone:.3f})")
    assert statuses == [200] * 3 and light.status_code == 200
    assert gap < max(heavy_s / 4, 3 * alone), f"the stream waited {gap:.2f} s while heavy requests took {heavy_s:.2f} s"
    if kind != "long prompt":  # preparation: text requests have their own pool (the engine prefills in order)
        assert light_s < heavy_s / 2, f"a text request took {light_s:.2f} s behind requests taking {heavy_s:.2f} s"


@pytest.mark.parametrize("field, value", [("temperature", 3), ("seed", 2**64), ("messages", "x")])
def test_large_bodies_parsed_in_the_parser_process_are_refused_as_small_ones(roomy, field, value):
    """A body over 256 KB is parsed in another process: its errors come back whole (status, param, code)."""
    body = {"model": MODEL, "messages": user("Hi"), "padding": "x" * 300_000, field: value}
    small = {k: v for k, v in body.items() if k != "padding"}
    large, reference = (roomy.http.post("/v1/chat/completions", json=b) for b in (body, small))
    assert large.status_code == reference.status_code == 400
    assert large.json() == reference.json() and large.json()["error"]["param"] == field


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_parser_process_ends_with_the_server(tiny_v2, tmp_path, sig):
    """Stopped (SIGTERM) or killed (SIGKILL, no shutdown code runs), the server leaves no parser process behind."""
    server = Server(tiny_v2, tmp_path / "server.log", "--max-body-mb", "4")
    try:
        body = {"model": MODEL, "messages": user("Hi"), "max_tokens": 1, "padding": "x" * 300_000}
        assert server.http.post("/v1/chat/completions", json=body).status_code == 200
        children = psutil.Process(server.process.pid).children(recursive=True)
        assert any("multiprocessing" in " ".join(c.cmdline()) for c in children)
    finally:
        server.stop(sig)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [c.cmdline() for c in alive]
