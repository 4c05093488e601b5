"""Fixtures for the fine-tuning tests: small JSONL datasets with images."""

from pathlib import Path

import pytest
import torch
from finetune_data import conversations, write_jsonl
from PIL import Image

from smolvlm.processing import Processor


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread: their matmuls are too small to split, and a second thread only
    waits (badly, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """train.jsonl of `conversations()` with its images in imgs/ (paths relative to the file)."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (48, 40), (200, 20, 20)).save(tmp_path / "imgs/red.png")
    Image.new("RGB", (200, 70), (20, 200, 20)).save(tmp_path / "imgs/wide.png")
    Image.new("RGB", (30, 100), (20, 20, 200)).save(tmp_path / "imgs/tall.png")
    return write_jsonl(tmp_path / "train.jsonl", conversations())


@pytest.fixture(scope="module")
def inputs(tiny_v2):
    """A prompt with an image (split into tiles) and a text-only one, right-padded into one batch."""
    processor = Processor.from_pretrained(tiny_v2)
    image = Image.new("RGB", (100, 60), (30, 140, 220))
    messages = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}],
                [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]]
    return processor.apply_chat_template(messages, tokenize=True, padding=True)
