"""Helpers of the batch tests: request lines, photos, `smolvlm run-batch` as a subprocess, reading results."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MAX_IMAGE_PIXELS = 40_000
CONTEXT = 512
NEW_TOKENS = 12
LIMITS = ["--max-batch", "4", "--max-model-len", str(CONTEXT), "--max-image-pixels", str(MAX_IMAGE_PIXELS),
          "--workers", "1"]


def picture(seed: int, size=(90, 140)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def line(custom_id, body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def ask(text: str, url: str | None = None, **fields) -> dict:
    content = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + [{"type": "text", "text": text}]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": NEW_TOKENS, **fields}


def run_batch(model: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "smolvlm.cli", "run-batch", "--model", str(model), *LIMITS, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def popen_batch(model: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "smolvlm.cli", "run-batch", "--model", str(model), *LIMITS, *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group: a kill takes its workers too


def results(path: Path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_text().splitlines()]


def answers(records: list[dict]) -> dict[str, str | None]:
    """custom_id (or line:N) -> the answer text, or None for an error line."""
    from smolvlm.batch.files import line_key

    return {line_key(r): None if r["error"] else r["response"]["body"]["choices"][0]["message"]["content"]
            for r in records}
