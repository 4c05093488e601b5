"""Time one photo -> pixel_values, ours against the reference (transformers' PIL image processor), in one run.

Both get the same photo-like image, as a PIL object and as a JPEG file, and must give bit-identical pixel_values.

    python benchmarks/preprocess.py [--folder CHECKPOINT] [--size 4000x3000] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
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


def timed(fns: dict, reps: int) -> tuple[dict, dict]:
    """Per function: median wall seconds, best wall seconds, median CPU seconds (this process, which a busy machine
    inflates less), and the last output. The functions take turns each rep, so load changes slow them alike."""
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    stats = {name: (statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name])) for name in fns}
    return stats, outputs


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
        print(f"{width}x{height} photo -> pixel_values ({args.folder.name}), {args.reps} reps after a warm-up, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        for kind, source in (("PIL image", image), ("JPEG file", jpeg)):
            stats, outputs = timed({
                "reference": lambda: reference(source, return_tensors="pt")["pixel_values"],
                "ours": lambda: ours([[load_image(source)]]).pixel_values,
            }, args.reps)
            assert torch.equal(outputs["reference"], outputs["ours"]), "pixel_values differ from the reference"
            for name in ("reference", "ours"):
                med, best, cpu = stats[name]
                print(f"  {kind:9}  {name:9}  wall {med * 1e3:5.0f} ms median, {best * 1e3:5.0f} ms best   "
                      f"CPU {cpu * 1e3:5.0f} ms")
            ratios = [stats["reference"][i] / stats["ours"][i] for i in range(3)]
            print(f"  {kind:9}  speed-up   x{ratios[0]:.2f} median wall, x{ratios[1]:.2f} best wall, x{ratios[2]:.2f} "
                  f"CPU; pixel_values {tuple(outputs['ours'].shape)} bit-identical")

if __name__ == "__main__":
    main()
