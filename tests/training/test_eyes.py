"""The eyes test: a tiny SmolVLM trained from random weights learns to see.

Task: "What colour is the shape?" about a circle or square of one of four colours, of random size and place, on a
random grey background; the answer is one token (" red", " blue", " green", " yellow"). After a short full fine-tune
through `finetune` (JSONL, images on disk, the written checkpoint), the greedy answer on fresh images is right at
least 95% of the time, while on blank images (no shape: nothing to see) it is at chance.
"""

import json

import numpy as np
import pytest
import torch
from finetune_data import write_jsonl
from PIL import Image, ImageDraw

from smolvlm import Model
from smolvlm.processing import Processor
from smolvlm.training import finetune
from tiny import make_tiny_checkpoint, needs_shared

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 40), "yellow": (230, 210, 30)}
QUESTION = "What colour is the shape?"
SIZE = 32  # pixels: one 32x32 tile of 8x8 patches -> 4 image tokens


def draw(rng: np.random.Generator, colour: str | None) -> Image.Image:
    grey = int(rng.integers(60, 200))
    image = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    if colour is not None:
        side = int(rng.integers(8, 17))
        x, y = (int(v) for v in rng.integers(0, SIZE - side, size=2))
        fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[colour])
        shape = ImageDraw.Draw(image).ellipse if rng.random() < 0.5 else ImageDraw.Draw(image).rectangle
        shape([x, y, x + side, y + side], fill=fill)
    return image


def question(image: dict) -> dict:
    return {"role": "user", "content": [{"type": "image", **image}, {"type": "text", "text": QUESTION}]}


@pytest.fixture(scope="module")
def eyes_checkpoint(tmp_path_factory):
    """A tiny model with the default (std 0.02) random init, seeing 32x32 images as one unsplit tile."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("eyes"), init_std=None,
                                  vision=dict(image_size=SIZE, patch_size=8))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre.update(size={"longest_edge": SIZE}, do_image_splitting=False)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


@needs_shared
def test_eyes(eyes_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    lines = []
    for i in range(256):
        draw(rng, names[i % 4]).save(tmp_path / f"{i}.png")
        lines.append({"messages": [question({"path": f"{i}.png"}), {"role": "assistant", "content": names[i % 4]}]})
    data = write_jsonl(tmp_path / "train.jsonl", lines)

    result = finetune(model=str(eyes_checkpoint), data=str(data), output=str(tmp_path / "out"), full=True, steps=80,
                      batch_size=16, lr=3e-3, warmup_steps=10, seed=0, progress=False)

    model, processor = Model.from_pretrained(result.output), Processor.from_pretrained(result.output)
    answers = torch.tensor([processor.tokenizer.token_to_id("Ġ" + n) for n in names])  # " red" ... one token each

    def accuracy(blank: bool, seed: int) -> tuple[float, float]:
        """(right answers, answers that are a colour) of the greedy first token on 200 fresh images."""
        test = np.random.default_rng(seed)
        truth = test.integers(0, 4, size=200)
        images = [draw(test, None if blank else names[t]) for t in truth]
        inputs = processor.apply_chat_template([[question({"image": im})] for im in images], tokenize=True)
        with torch.no_grad():
            greedy = model(**inputs)[:, -1].argmax(-1)
        return float((greedy == answers[truth]).float().mean()), float(torch.isin(greedy, answers).float().mean())

    seen, _ = accuracy(blank=False, seed=1)
    blind, blind_colours = accuracy(blank=True, seed=2)
    print(f"eyes: accuracy {seen:.3f} on held-out images, {blind:.3f} on blank images (chance 0.25); "
          f"final train loss {result.train_loss:.4f}")
    assert seen >= 0.95
    assert blind <= 0.45 and blind_colours == 1.0  # it still answers with a colour, just not the right one
