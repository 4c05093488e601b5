"""The workloads of benchmarks/bench.py: what each one asks (prompts, photos, batch, dtype) and its conversations."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about an old lighthouse keeper who finds a message in a bottle. Make it warm and surprising."
IMAGE_PROMPT = "Describe this image in detail."


@dataclass(frozen=True)
class Workload:
    what: str
    dtype: str = "bfloat16"
    image: tuple[int, int] | None = None  # (width, height) of the photo, None: text only
    split: bool = False  # the processor's default tiling (True) or one unsplit 512px tile
    batch: int = 1
    new_tokens: int = 64
    quantize: str | None = None
    video: int = 0  # frames of a video (then `image` is a frame's size), 0: none
    sides: tuple[str, ...] = ("ours", "reference")
    kind: str = "request"  # or a scenario of SCENARIOS


WORKLOADS = {
    "text": Workload("text prompt, 128 new tokens", new_tokens=128),
    "tile": Workload("one 512x512 image unsplit (1 tile), 64 new", image=(512, 512)),
    "photo": Workload("one 1536x1024 photo, default tiling, 64 new", image=(1536, 1024), split=True),
    "batch8": Workload("batch of 8 one-tile requests, 64 new each", image=(512, 512), batch=8),
    "tile-fp32": Workload("one 512x512 image unsplit, 64 new, fp32", dtype="float32", image=(512, 512)),
    "text-int8": Workload("text prompt, 128 new tokens, --quantize int8", new_tokens=128, quantize="int8",
                          sides=("ours",)),
    "chat3": Workload("3-turn chat about the 1536x1024 photo, each turn resent, 32 new", image=(1536, 1024),
                      split=True, new_tokens=32, kind="chat"),
    "same-image8": Workload("8 questions about the 1536x1024 photo in one batch call, 32 new", image=(1536, 1024),
                            split=True, batch=8, new_tokens=32, kind="shared", sides=("ours",)),
    "join7": Workload("the photo request joining 7 running text streams", image=(1536, 1024), split=True, batch=8,
                      new_tokens=8, kind="join", sides=("ours",)),
    "batch32": Workload("batch of 32 text prompts, 64 new each", batch=32),
    "batch64": Workload("batch of 64 text prompts, 64 new each", batch=64),
    "vision": Workload("the vision tower alone on 64 random tiles (one call)", batch=64, kind="vision"),
    "video64": Workload("a 64-frame video (640x360 frames, 1 fps), 16 new", image=(640, 360), video=64, new_tokens=16,
                        sides=("ours",)),
    "fp32-identity": Workload("greedy tokens of fp32 on the device against fp32 on the CPU: 2 text, 2 one-tile rows, "
                              "32 new", dtype="float32", batch=2, new_tokens=32, kind="identity", sides=("ours",)),
}
QUICK = ("text", "tile", "text-int8")


def photo(width: int, height: int, seed: int):
    """Smooth colour fields with pixel noise: resizes and tiles like a photo (benchmarks/preprocess.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from preprocess import photo as make

    return make(width, height, seed)


QUESTIONS = ["Describe this image in detail.", "What colours stand out, and where?", "Is there any text in it?",
             "How many objects can you count?", "What time of day is it?", "Where could this be?",
             "What is in the top left corner?", "Give it a title."]


def user(text: str, image=None) -> dict:
    return {"role": "user", "content": ([] if image is None else [{"type": "image", "image": image}])
            + [{"type": "text", "text": text}]}


def conversations(w: Workload) -> list:
    if w.video:
        from smolvlm import VideoFrames

        frames = VideoFrames([photo(*w.image, seed=i) for i in range(w.video)], fps=1.0)
        return [[{"role": "user", "content": [{"type": "video", "video": frames},
                                              {"type": "text", "text": "Describe this video."}]}]]
    if w.image is None:
        return [[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}] for _ in range(w.batch)]
    return [[{"role": "user", "content": [{"type": "image", "image": photo(*w.image, seed=i)},
                                          {"type": "text", "text": IMAGE_PROMPT}]}] for i in range(w.batch)]
