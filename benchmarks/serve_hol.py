"""Head-of-line blocking in `smolvlm serve`: what heavy requests cost the other clients. While a stream is running,
bursts of heavy requests are sent (each kind in turn); the script reports the stream's longest wait between two
chunks and the latency of a small text request sent just after the burst, each beside its value with no burst.

Kinds: `images` (requests of several large PNGs, `detail: low` so that the engine encodes one tile per image and
the burst measures decoding), `body` (a 28 MB body of 400,000 small JSON objects in an ignored field) and `prompt`
(a prompt of 4000 words: chunked prefill).

    python benchmarks/serve_hol.py --model FOLDER [--repo DIR] [--burst 4] [--images 4] [--side 1600]

--repo runs the server of another checkout (e.g. main, for a before/after on the same machine).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def png(side: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def bodies(images: int, side: int) -> dict[str, bytes]:
    parts = [{"type": "image_url", "image_url": {"url": png(side, i), "detail": "low"}} for i in range(images)]
    return {name: json.dumps(body).encode() for name, body in {
        "images": {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "?"}]}], "max_tokens": 1},
        "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                 "padding": [{"key": i, "value": "x" * 40} for i in range(400_000)]},
        "prompt": {"messages": [{"role": "user", "content": "word " * 4000}], "max_tokens": 1},
    }.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--burst", type=int, default=4, help="heavy requests sent at once")
    p.add_argument("--images", type=int, default=4, help="images per image request")
    p.add_argument("--side", type=int, default=1600)
    p.add_argument("--kinds", default="images,body,prompt")
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "smolvlm.cli", "serve", "--model", args.model, "--port",
                               str(port), "--log-level", "warning", "--max-body-mb", "512", "--max-images",
                               str(args.images)], cwd=args.repo, env={**os.environ, "PYTHONPATH": args.repo})
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    light = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}

    def latency() -> float:
        start = time.perf_counter()
        assert http.post("/v1/chat/completions", json=light).status_code == 200
        return time.perf_counter() - start

    def measure(body: bytes | None) -> tuple[float, float, float]:
        """(the stream's longest gap, the text request's latency, the burst's seconds) with `body` sent in a burst."""
        times, stop = [], threading.Event()

        def stream():
            request = {"messages": [{"role": "user", "content": "Tell a story"}], "max_tokens": 4000, "stream": True,
                       "temperature": 1, "seed": 0}
            with http.stream("POST", "/v1/chat/completions", json=request) as response:
                for line in response.iter_lines():
                    times.append(time.perf_counter())
                    if stop.is_set():
                        return

        streamer = threading.Thread(target=stream)
        streamer.start()
        while len(times) < 10:
            time.sleep(0.01)
        start = time.perf_counter()
        burst = [threading.Thread(target=http.post, args=("/v1/chat/completions",),
                                  kwargs={"content": body, "headers": {"content-type": "application/json"}})
                 for _ in range(args.burst if body else 0)]
        for t in burst:
            t.start()
        time.sleep(0.3)
        text = latency()
        for t in burst:
            t.join()
        seconds = time.perf_counter() - start
        if not burst:
            time.sleep(3)
        stop.set()
        streamer.join()
        inside = [t for t in times if t >= start]
        return max(b - a for a, b in zip(inside, inside[1:])), text, seconds

    try:
        while True:
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        heavy = bodies(args.images, args.side)
        latency()  # warm up (and start the parser process of large bodies, where there is one)
        http.post("/v1/chat/completions", content=heavy["body"], headers={"content-type": "application/json"})
        gap, text, _ = measure(None)
        print(f"# repo {args.repo}, load average {os.getloadavg()[0]:.1f}")
        print(f"| alone | - | {gap:.3f} s | {text:.3f} s |")
        for kind in args.kinds.split(","):
            gap, text, seconds = measure(heavy[kind])
            print(f"| {args.burst} x {kind} ({len(heavy[kind]) / 1e6:.1f} MB) | {seconds:.1f} s | {gap:.3f} s | "
                  f"{text:.3f} s |", flush=True)
    finally:
        http.close()
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
