"""The eyes test: a tiny SmolVLM trained from random weights learns to see.

Task: "What colour is the shape?" about a circle or square of one of four colours, of random size and place, on a
random grey background; the answer is one token (" red", " blue", " green", " yellow"). After a short fine-tune
through `finetune` (images on disk, the written checkpoint), the greedy answer on fresh images is right at least 95% of
the time, while on blank images (no shape: nothing to see) it is at chance. The same data trains as our JSONL, as a
ShareGPT/LLaVA file and as a `datasets` Parquet file (full fine-tuning), and with QLoRA (4-bit NF4 base + LoRA on
the text model, connector and vision encoder, merged into the full-precision base at the end).
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


def write_data(folder, data_format: str, names: list[str], rng) -> str:
    """256 training images in `folder` and their questions in `data_format`; the path to give --data."""
    colours = [names[i % 4] for i in range(256)]
    for i, colour in enumerate(colours):
        draw(rng, colour).save(folder / f"{i}.png")
    if data_format == "sharegpt":
        return str(write_jsonl(folder / "train.jsonl", [
            {"conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": colour}],
             "image": f"{i}.png"} for i, colour in enumerate(colours)]))
    if data_format == "parquet":  # TRL's VLM layout: an "images" column, image blocks without a source in "messages"
        import datasets

        table = datasets.Dataset.from_dict(
            {"images": [[str(folder / f"{i}.png")] for i in range(256)],
             "messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                           {"role": "assistant", "content": [{"type": "text", "text": colour}]}] for colour in colours]},
            features=None).cast_column("images", datasets.Sequence(datasets.Image()))
        table.to_parquet(str(folder / "train.parquet"))
        return str(folder / "train.parquet")
    return str(write_jsonl(folder / "train.jsonl", [
        {"messages": [question({"path": f"{i}.png"}), {"role": "assistant", "content": colour}]}
        for i, colour in enumerate(colours)]))


TRAINING = {
    "full": dict(full=True, lr=3e-3),
    "sharegpt": dict(full=True, lr=3e-3),
    "parquet": dict(full=True, lr=3e-3),
    "qlora": dict(qlora=True, lora_r=16, lr=1e-3, lora_targets="text,connector,vision", merge=True),
}


@needs_shared
@pytest.mark.parametrize("kind", list(TRAINING))
def test_eyes(kind, eyes_checkpoint, tmp_path):
    names = list(COLOURS)
    data = write_data(tmp_path, kind, names, np.random.default_rng(0))
    result = finetune(model=str(eyes_checkpoint), data=data, output=str(tmp_path / "out"), steps=80, batch_size=16,
                      warmup_steps=10, seed=0, progress=False, **TRAINING[kind])

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
    print(f"eyes ({kind}): accuracy {seen:.3f} on held-out images, {blind:.3f} on blank images (chance 0.25); "
          f"final train loss {result.train_loss:.4f}")
    assert seen >= 0.95
    assert blind <= 0.45 and blind_colours == 1.0  # it still answers with a colour, just not the right one
