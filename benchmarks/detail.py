"""Image `detail` through the server: time to first token of the 1536x1024 photo (13 tiles with the checkpoint's
tiling) sent with OpenAI's `detail: "low"` (one tile) against the default, over HTTP with the official openai client
(streaming; TTFT = request sent -> first content chunk, so fetching the data: URL, decoding, tiling, vision and prefill
all count). One `smolvlm serve` process on a random-weight checkpoint of a released shape (benchmarks/checkpoint.py);
the two kinds of request alternate, so a loaded machine slows both alike; the table gives medians.

    python benchmarks/detail.py                     # smolvlm2-256m bf16, 2 threads, CPU
    python benchmarks/detail.py --reps 5
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "serving"))


def ttft(client, image_url: dict) -> tuple[float, int]:
    """(seconds to the first content chunk, prompt tokens) of one streamed request."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": image_url},
                                             {"type": "text", "text": "Describe this image in detail."}]}]
    start, first, usage = time.perf_counter(), None, None
    for chunk in client.chat.completions.create(model="bench", messages=messages, max_tokens=8, stream=True,
                                                stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        usage = chunk.usage or usage
    return first, usage.prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smolvlm2-256m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--folder", default="/tmp/smolvlm-bench/smolvlm2-256m-bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import openai
    from checkpoint import make_random_checkpoint
    from preprocess import photo
    from server_process import free_port

    folder = make_random_checkpoint(args.shape, args.folder, args.dtype)
    buffer = io.BytesIO()
    photo(1536, 1024, seed=0).save(buffer, format="JPEG", quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "smolvlm.cli", "serve", "--model", str(folder), "--port", str(port),
         "--served-model-name", "bench", "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=300)
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
        kinds = {"default (checkpoint tiling)": {"url": url}, 'detail: "low"': {"url": url, "detail": "low"}}
        for image_url in kinds.values():
            ttft(client, image_url)  # warm-up
        times = {kind: [] for kind in kinds}
        tokens = {}
        for _ in range(args.reps):
            for kind, image_url in kinds.items():
                seconds, tokens[kind] = ttft(client, image_url)
                times[kind].append(seconds)
    finally:
        server.terminate()
        server.wait(30)
    base = statistics.median(times["default (checkpoint tiling)"])
    print(f"{args.shape} {args.dtype}, {args.threads} threads, 1536x1024 JPEG photo over HTTP, median of {args.reps}")
    print("| image detail | prompt tokens | time to first token | ratio |\n| --- | --- | --- | --- |")
    for kind in kinds:
        median = statistics.median(times[kind])
        print(f"| {kind} | {tokens[kind]} | {median:.2f} s | x{median / base:.2f} |")


if __name__ == "__main__":
    main()
