"""Time one photo -> pixel_values, ours against the reference (transformers' PIL image processor), in one run.

Both get the same photo-like image, as a PIL object and as a JPEG file, and must give bit-identical pixel_values.

    python benchmarks/preprocess.py [--folder CHECKPOINT] [--size 4000x3000] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smolvlm.processing import Processor, load_image

CHECKPOINT_FILES = Path(__file__).resolve().parents[1].parent / "shared" / "checkpoint-files"
DEFAULT_FOLDER = CHECKPOINT_FILES / "SmolVLM2-500M-Video-Instruct"


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields with pixel noise: resizes like a photo, compresses like one."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    return Image.fromarray(np.asarray(base) ^ rng.integers(0, 16, (height, width, 3), dtype=np.uint8))


def timed(fn, reps: int) -> tuple[list[float], torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="checkpoint folder (preprocessor config)")
    parser.add_argument("--size", default="4000x3000", help="photo WIDTHxHEIGHT")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))

    from transformers import AutoImageProcessor  # the reference: a benchmark-only import

    reference = AutoImageProcessor.from_pretrained(args.folder, backend="pil")
    ours = Processor.from_pretrained(args.folder).image_processor
    image = photo(width, height)
    with tempfile.TemporaryDirectory() as tmp:
        jpeg = str(Path(tmp) / "photo.jpg")
        image.save(jpeg, quality=90)
        print(f"{width}x{height} photo -> pixel_values, {args.reps} reps after a warm-up, torch threads "
              f"{torch.get_num_threads()} ({args.folder.name})")
        for name, source in (("PIL image", image), ("JPEG file", jpeg)):
            ref_times, ref_out = timed(lambda: reference(source, return_tensors="pt")["pixel_values"], args.reps)
            our_times, our_out = timed(lambda: ours([[load_image(source)]]).pixel_values, args.reps)
            assert torch.equal(ref_out, our_out), "pixel_values differ from the reference"
            ref_ms, our_ms = statistics.median(ref_times) * 1e3, statistics.median(our_times) * 1e3
            print(f"  {name:9}  reference {ref_ms:7.1f} ms   ours {our_ms:7.1f} ms   speed-up x{ref_ms / our_ms:.2f}   "
                  f"(median; {tuple(our_out.shape)} bit-identical)")


if __name__ == "__main__":
    main()
