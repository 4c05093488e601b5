"""A real `smolvlm serve` process on 127.0.0.1 (a free port), and helpers to build requests."""

from __future__ import annotations

import base64
import io
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key"
MODEL = "tiny"
START_TIMEOUT_S = 90

# The shared server's limits (the error tests exceed each of them).
CONTEXT = 2048
MAX_TOKENS = 2000  # long enough (about 3 s on the tiny model) for a client to go away mid-answer
MAX_IMAGES = 2
MAX_IMAGE_PIXELS = 40_000
MAX_VIDEO_SECONDS = 5
MAX_BODY_MB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m smolvlm.cli serve --model FOLDER ARGS...` on a free port; ready once GET /health answers."""

    def __init__(self, folder: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "smolvlm.cli", "serve", "--model", str(folder), "--port", str(self.port),
               "--served-model-name", MODEL, "--api-key", KEY, "--log-level", "warning", *args]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{log.read_text()}")
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start in {START_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(0.2)

    def health(self) -> dict:
        return self.http.get("/health").json()

    def chat(self, **body) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={"model": MODEL, **body})

    def openai(self, api_key: str = KEY):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """/health once no request holds a slot or waits for one (polled, bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
                return health
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def png_data_url(width: int, height: int, seed: int = 0, mode: str = "RGB") -> str:
    """A PNG of random pixels; mode "RGBA" (random alpha) or "P" (a palette with a transparent colour) too."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA") if mode == "RGBA" else Image.fromarray(pixels[..., :3])
    buffer = io.BytesIO()
    if mode == "P":
        image.convert("P").save(buffer, format="PNG", transparency=3)
    else:
        image.save(buffer, format="PNG")
    return data_url(buffer.getvalue(), "image/png")


def exif_jpeg_data_url(width: int, height: int, seed: int = 0) -> str:
    """A JPEG whose EXIF orientation (6: rotate 90 degrees) the decoder must apply."""
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return data_url(buffer.getvalue(), "image/jpeg")


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user(text: str, *image_urls: str) -> list[dict]:
    """One OpenAI user message: the images (image_url parts), then the text."""
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]
