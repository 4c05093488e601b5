"""Offline captioning: `smolvlm run-batch` against the reference used the way its docs show (transformers' processor
and batched `generate`, 8 images a batch), on the same photos, in one run.

Photos of mixed sizes (seeded, written as JPEG) and a random-weight checkpoint of a released shape
(benchmarks/checkpoint.py); each image gets the same prompt and --new-tokens new tokens (the reference is held to
exactly that many with min_new_tokens; a random-weight model almost never ends earlier on our side either: the table
gives the tokens each side generated). Both tilings: the processor's default splitting and --no-image-splitting. Each
side runs in its own process; images/minute is counted from the first image to the last answer (model loading
excluded, our worker start-up included). Also: each side's peak RSS (ours: the engine process and the largest
preparation worker) and the share of time our engine waited for input.

    python benchmarks/batch.py                          # 200 photos, both tilings (long on a CPU)
    python benchmarks/batch.py --images 24 --modes nosplit
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "Describe this image."
REFERENCE_BATCH = 8
SIZES = [(640, 480), (1024, 768), (1536, 1024), (800, 1200), (512, 512), (2048, 1536), (300, 200), (1200, 900),
         (720, 1280), (1600, 1200)]  # (width, height), cycled: phone photos, scans, thumbnails
MODES = {"split": True, "nosplit": False}


def photos(folder: Path, n: int) -> list[Path]:
    from preprocess import photo

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo{i:04d}.jpg"
        if not path.exists():
            photo(*SIZES[i % len(SIZES)], seed=i).save(path, quality=90)
        paths.append(path)
    return paths


def reference(args) -> None:
    """The reference side (in its own process): batches of 8 through the processor and `generate`; prints JSON."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from bench import peak_rss_mb
    from sides import _reference_processor

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    processor = _reference_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    paths = sorted(Path(args.photos).glob("*.jpg"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(paths), REFERENCE_BATCH):
        batch = [[Image.open(p).convert("RGB")] for p in paths[i : i + REFERENCE_BATCH]]
        inputs = processor(text=[prompt] * len(batch), images=batch, padding=True, padding_side="left",
                           do_image_splitting=MODES[args.mode], return_tensors="pt").to(args.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False)
        tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * len(batch)
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_min": len(paths) / seconds * 60, "seconds": seconds, "tokens": tokens,
                      "peak_rss_mb": peak_rss_mb()}))


def ours(args, folder: Path, photo_folder: Path, mode: str, out: Path) -> dict:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "smolvlm.cli", "run-batch", "--model", str(folder), "--dtype", args.dtype,
           "--images", str(photo_folder), "--prompt", PROMPT, "--max-new-tokens", str(args.new_tokens), "-o",
           str(out), "--max-batch", str(args.max_batch), "--workers", str(args.workers), "--device", args.device]
    if not MODES[mode]:
        cmd.append("--no-image-splitting")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run-batch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = re.search(r"(\d+) items .* in ([\d.]+) s: ([\d.]+) items/min, ([\d.]+) generated tok/s; engine waited "
                        r"for input (\d+)% of the time, batch (\d+)% full; peak RSS (\d+) MB \(workers (\d+) MB\)",
                        done.stderr)
    n, seconds, rate, tps, wait, fill, rss, worker_rss = summary.groups()
    tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
                 for line in out.read_text().splitlines())
    return {"images_per_min": float(rate), "seconds": float(seconds), "tokens": tokens, "wait_share": int(wait) / 100,
            "batch_fill": int(fill) / 100, "peak_rss_mb": float(rss), "worker_rss_mb": float(worker_rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", default="split,nosplit", help="split (default tiling), nosplit")
    parser.add_argument("--shape", default="smolvlm2-256m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the reference")
    parser.add_argument("--max-batch", type=int, default=16, help="run-batch --max-batch")
    parser.add_argument("--workers", type=int, default=1, help="run-batch --workers")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "smolvlm-bench-batch"))
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--reference-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--photos", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_side:
        return reference(args)

    from checkpoint import make_random_checkpoint

    work = Path(args.work)
    folder = make_random_checkpoint(args.shape, work / f"{args.shape}-{args.dtype}", args.dtype)
    photo_folder = work / f"photos-{args.images}"
    photos(photo_folder, args.images)
    results = {}
    for mode in args.modes.split(","):
        ref = subprocess.run([sys.executable, __file__, "--reference-side", "--folder", str(folder), "--photos",
                              str(photo_folder), "--mode", mode, "--dtype", args.dtype, "--threads", str(args.threads),
                              "--new-tokens", str(args.new_tokens), "--device", args.device], cwd=ROOT,
                             capture_output=True, text=True)
        if ref.returncode != 0:
            raise SystemExit(f"the reference side failed:\n{ref.stderr[-3000:]}")
        results[mode] = {"ours": ours(args, folder, photo_folder, mode, work / f"out-{mode}.jsonl"),
                         "reference": json.loads(ref.stdout.strip().splitlines()[-1])}
    print(f"{args.images} photos of mixed sizes, {args.new_tokens} new tokens each, {args.shape} {args.dtype} on "
          f"{args.device}, "
          f"run-batch --max-batch {args.max_batch} --workers {args.workers} vs reference batches of "
          f"{REFERENCE_BATCH}\n")
    print("| tiling | images/min: run-batch | reference | ratio | peak RSS: run-batch (worker) | reference | "
          "engine waited for input | tokens: ours / reference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        o, ref = r["ours"], r["reference"]
        print(f"| {'default' if MODES[mode] else '--no-image-splitting'} | {o['images_per_min']:.1f} | "
              f"{ref['images_per_min']:.1f} | **{o['images_per_min'] / ref['images_per_min']:.2f}x** (bar 2x) | "
              f"{o['peak_rss_mb']:.0f} MB ({o['worker_rss_mb']:.0f} MB) | {ref['peak_rss_mb']:.0f} MB | "
              f"{o['wait_share']:.0%} | {o['tokens']} / {ref['tokens']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
