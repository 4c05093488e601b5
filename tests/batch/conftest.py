"""Fixtures of the batch tests: photos (good and bad), an OpenAI Batch input with good and bad requests, and one
uninterrupted run of it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from batch_jobs import CONTEXT, ask, line, picture, png, results, run_batch
from PIL import Image


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


@pytest.fixture(scope="package")
def clean_run(tiny_v2, requests_file, tmp_path_factory):
    """One uninterrupted run over requests_file: (completed process, its result lines)."""
    out = tmp_path_factory.mktemp("clean") / "results.jsonl"
    done = run_batch(tiny_v2, "-i", str(requests_file[0]), "-o", str(out))
    return done, results(out)
