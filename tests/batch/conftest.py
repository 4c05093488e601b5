"""A batch input with good and bad requests over the tiny checkpoint, and `smolvlm run-batch` as a subprocess."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


@pytest.fixture(scope="package")
def photos(tmp_path_factory) -> Path:
    """Six good photos of mixed sizes, and the bad files: corrupt.png (not an image), big.png (over the pixel limit)."""
    folder = tmp_path_factory.mktemp("photos")
    for i, size in enumerate([(90, 140), (64, 64), (200, 60), (33, 180), (128, 128), (100, 30)]):
        picture(i, size).save(folder / f"p{i}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really an image")
    picture(9, (300, 300)).save(folder / "big.png")  # 90,000 pixels > MAX_IMAGE_PIXELS
    return folder


@pytest.fixture(scope="package")
def requests_file(photos, tmp_path_factory) -> tuple[Path, set[str], dict[str, str]]:
    """(OpenAI Batch input, the good custom_ids, the bad ones -> what their error names). The input also holds a
    line that is not JSON, one without custom_id, and a repeated custom_id."""
    good, lines = set(), []
    for i in range(6):
        url = (photos / f"p{i}.png").as_uri() if i % 2 else "data:image/png;base64," + base64.b64encode(
            png(Image.open(photos / f"p{i}.png"))).decode()
        lines.append(line(f"photo-{i}", ask(f"Describe picture {i}.", url)))
        lines.append(line(f"text-{i}", ask(f"Write about the number {i}.", temperature=0.8, seed=i)))
        good |= {f"photo-{i}", f"text-{i}"}
    bad = {
        "corrupt": ask("?", (photos / "corrupt.png").as_uri()),
        "missing": ask("?", (photos / "missing.png").as_uri()),
        "oversized": ask("?", (photos / "big.png").as_uri()),
        "too-long": ask("word " * 2 * CONTEXT),
        "invalid": ask("?", temperature="hot"),
    }
    names = {"corrupt": "not an image", "missing": "missing.png", "oversized": "--max-image-pixels",
             "too-long": "maximum context length", "invalid": "temperature"}
    for n, (custom_id, body) in enumerate(bad.items()):
        lines.insert(2 * n + 1, line(custom_id, body))
    lines += ["{not json", json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": ask("hi")}),
              line("text-0", ask("A repeated custom_id"))]
    path = tmp_path_factory.mktemp("batch") / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, good, names


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


@pytest.fixture(scope="package")
def clean_run(tiny_v2, requests_file, tmp_path_factory):
    """One uninterrupted run over requests_file: (completed process, its result lines)."""
    out = tmp_path_factory.mktemp("clean") / "results.jsonl"
    done = run_batch(tiny_v2, "-i", str(requests_file[0]), "-o", str(out))
    return done, results(out)
