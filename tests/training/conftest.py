"""Fixtures for the fine-tuning tests: small JSONL datasets with images, written next to a tiny checkpoint."""

import json
from pathlib import Path

import pytest
from PIL import Image


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON value per line (strings are written as they are, for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def user(text: str, *images: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "path": i} for i in images] + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def conversations() -> list[dict]:
    """Records covering the chat format: images of several sizes (split into different tile grids), string content,
    a system turn, two assistant turns, an image after text, and no image at all."""
    return [
        {"messages": [user("What colour is this?", "imgs/red.png"), assistant("Red.")]},
        {"messages": [{"role": "system", "content": "Answer in one word."},
                      {"role": "user", "content": "Hello"},
                      assistant("Hi there"),
                      user("And these two?", "imgs/wide.png", "imgs/tall.png"),
                      {"role": "assistant", "content": "Green and blue"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image", "image": "imgs/red.png"}]},
                      assistant("A red square.")]},
        {"messages": [{"role": "user", "content": "Count to three."}, assistant("1 2 3")]},
    ]


@pytest.fixture
def dataset(tmp_path) -> Path:
    """train.jsonl of `conversations()` with its images in imgs/ (paths relative to the file)."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (48, 40), (200, 20, 20)).save(tmp_path / "imgs/red.png")
    Image.new("RGB", (200, 70), (20, 200, 20)).save(tmp_path / "imgs/wide.png")
    Image.new("RGB", (30, 100), (20, 20, 200)).save(tmp_path / "imgs/tall.png")
    return write_jsonl(tmp_path / "train.jsonl", conversations())
