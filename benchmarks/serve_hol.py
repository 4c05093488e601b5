"""Head-of-line blocking in `smolvlm serve`: the latency of a small text request sent just after a burst of
image-heavy ones. Media are decoded in their own pool, so the text request should not wait for them.

    python benchmarks/serve_hol.py --model FOLDER [--repo DIR] [--image-requests 8] [--images 8] [--side 1600]

--repo runs the server of another checkout (e.g. main, for a before/after on the same machine).
"""

from __future__ import annotations

import argparse
import base64
import io
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--image-requests", type=int, default=8)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--side", type=int, default=1600)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "smolvlm.cli", "serve", "--model", args.model, "--port",
                               str(port), "--log-level", "warning", "--max-body-mb", "512", "--max-images",
                               str(args.images)], cwd=args.repo, env={**os.environ, "PYTHONPATH": args.repo})
    http = httpx.Client(base_url=url, timeout=600)
    try:
        while True:
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        images = [png(args.side, i) for i in range(args.images)]
        heavy = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}
                                                           for u in images] + [{"type": "text", "text": "?"}]}],
                 "max_tokens": 1}
        light = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}

        def text_latency() -> float:
            start = time.perf_counter()
            assert http.post("/v1/chat/completions", json=light).status_code == 200
            return time.perf_counter() - start

        alone = min(text_latency() for _ in range(3))
        behind = []
        for _ in range(args.reps):
            burst = [threading.Thread(target=http.post, args=("/v1/chat/completions",), kwargs={"json": heavy})
                     for _ in range(args.image_requests)]
            for t in burst:
                t.start()
            time.sleep(0.5)  # the image requests are parsed and decoding
            behind.append(text_latency())
            for t in burst:
                t.join()
        print(f"repo {args.repo}: text request alone {alone:.3f} s; behind {args.image_requests} requests of "
              f"{args.images} {args.side}x{args.side} images: " + ", ".join(f"{b:.3f}" for b in behind) + " s")
    finally:
        http.close()
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
