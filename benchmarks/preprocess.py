"""Time photos -> pixel_values: ours, ours before the C++ resize (the Pillow path it falls back to, which was the
implementation until then) and the reference (transformers' PIL image processor), taking turns in one run.

All get the same photo-like image, as a PIL object and as a JPEG file (decode included), with the checkpoint's tiling
and unsplit, and must give bit-identical pixel_values.

    python benchmarks/preprocess.py [--folder CHECKPOINT] [--size 512x512 --size 1536x1024] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

from smolvlm.processing import Processor, load_image, resample

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


def pillow_path(fn):
    """fn() with the C++ resize off: the image processor's Pillow fallback."""
    with mock.patch.object(resample, "load", lambda: None):
        return fn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="checkpoint folder (preprocessor config)")
    parser.add_argument("--size", action="append", help="photo WIDTHxHEIGHT (repeatable; default 512x512, 1536x1024 "
                        "and 4000x3000)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from transformers import AutoImageProcessor  # the reference: a benchmark-only import

    if resample.load() is None:
        raise SystemExit("the C++ resize can't be built here: nothing to compare")
    print(f"photo -> pixel_values ({args.folder.name}), {args.reps} reps after a warm-up, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}; wall and CPU medians")
    names = ("reference", "before", "ours")
    for size in args.size or ["512x512", "1536x1024", "4000x3000"]:
        width, height = map(int, size.split("x"))
        image = photo(width, height)
        with tempfile.TemporaryDirectory() as tmp:
            jpeg = str(Path(tmp) / "photo.jpg")
            image.save(jpeg, quality=90)
            for split in (True, False):
                reference = AutoImageProcessor.from_pretrained(args.folder, backend="pil", do_image_splitting=split)
                ours = Processor.from_pretrained(args.folder).image_processor.with_overrides(do_image_splitting=split)
                for kind, source in (("JPEG file", jpeg), ("PIL image", image)):
                    stats, outputs = timed({
                        "reference": lambda: reference(source, return_tensors="pt")["pixel_values"],
                        "before": lambda: pillow_path(lambda: ours([[load_image(source)]]).pixel_values),
                        "ours": lambda: ours([[load_image(source)]]).pixel_values,
                    }, args.reps)
                    for name in names:
                        assert torch.equal(outputs["reference"], outputs[name]), f"{name}: pixel_values differ"
                    times = "  ".join(f"{name} {stats[name][0] * 1e3:4.0f} / {stats[name][2] * 1e3:4.0f} ms"
                                      for name in names)
                    ratios = [stats[name][0] / stats["ours"][0] for name in ("before", "reference")]
                    print(f"  {size:9} {'tiled' if split else 'unsplit':7} {outputs['ours'].shape[1]:2} frames  "
                          f"{kind}  {times}   ours x{ratios[0]:.2f} faster than before, x{ratios[1]:.2f} than "
                          "the reference (wall)")


if __name__ == "__main__":
    main()
