"""smolvlm against the reference (transformers 5.23, SDPA) on the workloads of issue #7, in one run.

A random-weight checkpoint of a released shape (benchmarks/checkpoint.py; the bf16 file is byte-for-byte the published
size) is built once. Every (workload, side) runs in its own fresh process, so each side's peak memory (max RSS) and
cold start (process start -> first token, imports and loading included) are its own. In a process: one cold request,
then `--reps` timed ones; the table gives their medians and the ratio ours / reference.

    python benchmarks/bench.py                       # all workloads, 2 threads, CPU (about 5 minutes)
    python benchmarks/bench.py --quick               # 1 rep of text, tile and int8 (about a minute)
    python benchmarks/bench.py --device cuda         # the same on a GPU
    python benchmarks/bench.py --device cuda --only text,batch64,vision,video64,fp32-identity   # GPU workloads (#19)
    python benchmarks/bench.py --device cuda --shape smolvlm2-500m --only text,batch64
    python benchmarks/bench.py --only text,tile --reps 5 --json results.json
    python benchmarks/bench.py --only chat3,same-image8,join7 --reps 1   # the caches and chunked prefill (#12)

On the CPU the request workloads run ours as `smolvlm.load` does, with its caches on (the default budget), emptied
before each request (each rep would otherwise find the last one's work), so peak memory includes what they keep (on a
GPU: without caches); chat3, same-image8 and join7 measure the caches and chunked prefill
(smolvlm/generation/caches.py, scheduler.py). On a GPU (#19): batch32/batch64 decode throughput, `vision` (the
tower alone on 64 tiles, against the time its FLOPs take at the bf16 matmul rate measured in the same process),
`video64` (a 64-frame video's peak GPU memory against the model card's ~1.4 GB) and `fp32-identity` (greedy tokens
of the fp32 path on the device against the CPU's). A worker that fails or runs past `--timeout` is reported and the
others go on; `--json` is rewritten after every worker.

Layout: workloads.py (what each workload asks, its conversations), scenarios.py (the workloads that are not one
request: chat3, same-image8, join7, vision, fp32-identity), sides.py (ours and the reference); this file runs each
(workload, side) in its own process and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scenarios import SCENARIOS
from workloads import QUICK, ROOT, WORKLOADS, conversations


# (workload, metric) -> (bound, "max"/"min", baseline) on ours / baseline; baseline "reference" or another workload.
TARGETS = {
    ("text", "decode_tps"): (3.0, "min", "reference"),
    ("tile", "vision_tile_s"): (0.5, "max", "reference"),
    ("photo", "ttft_s"): (0.5, "max", "reference"),
    ("batch8", "total_s"): (0.4, "max", "reference"),
    ("tile-fp32", "decode_tps"): (2.0, "min", "reference"),
    ("text-int8", "decode_tps"): (1.3, "min", "text"),
    ("chat3", "ttft_turn2_s"): (0.05, "max", "reference"),
    ("chat3", "ttft_turn3_s"): (0.05, "max", "reference"),
}
# The GPU's bars (issue #19) replace the CPU's where both name a metric.
GPU_TARGETS = {
    ("text", "decode_tps"): (5.0, "min", "reference"),
    ("batch64", "decode_all_tps"): (2.0, "min", "reference"),
}
# Ratios of one side's own metrics (ours): (workload, metric) -> (bound, "max"/"min"), printed as "x0.03 (≤0.05 met)"
SELF_TARGETS = {
    ("chat3", "turn2_vs_turn1"): (0.05, "max"), ("chat3", "turn3_vs_turn1"): (0.05, "max"),
    ("same-image8", "cached_vs_uncached"): (0.5, "max"), ("join7", "max_gap_s"): (0.6, "max"),
    ("vision", "vision_vs_matmul"): (2.0, "max"), ("fp32-identity", "identical_rows"): (1.0, "min"),
    ("video64", "peak_gpu_vs_card"): (1.0, "max"),
}
VIDEO_CARD_MB = 1400  # SmolVLM2-256M's model card: ~1.4 GB of GPU memory for video inference
METRICS = [  # key, label, unit scale, format
    ("preprocess_s", "preprocessing", 1e3, "{:.0f} ms"),
    ("vision_tile_s", "vision per tile", 1e3, "{:.0f} ms"),
    ("ttft_s", "time to first token", 1e3, "{:.0f} ms"),
    ("decode_tps", "decode tok/s (per row)", 1, "{:.1f}"),
    ("decode_all_tps", "decode tok/s (all rows)", 1, "{:.1f}"),
    ("total_s", "total", 1, "{:.2f} s"),
    ("ttft_turn2_s", "turn 2 time to first token", 1e3, "{:.0f} ms"),
    ("ttft_turn3_s", "turn 3 time to first token", 1e3, "{:.0f} ms"),
    ("cached_turn3", "turn 3 prompt tokens cached", 1, "{:.0f}"),
    ("turn2_vs_turn1", "turn 2 / turn 1 time to first token", 1, "x{:.3f}"),
    ("turn3_vs_turn1", "turn 3 / turn 1 time to first token", 1, "x{:.3f}"),
    ("total_uncached_s", "total, caches off", 1, "{:.2f} s"),
    ("cached_vs_uncached", "total caches on / off", 1, "x{:.2f}"),
    ("max_gap_s", "streams' longest inter-token gap, chunked", 1e3, "{:.0f} ms"),
    ("p50_gap_s", "streams' p50 inter-token gap, chunked", 1e3, "{:.0f} ms"),
    ("p95_gap_s", "streams' p95 inter-token gap, chunked", 1e3, "{:.0f} ms"),
    ("max_gap_unchunked_s", "streams' longest inter-token gap, unchunked", 1e3, "{:.0f} ms"),
    ("p50_gap_unchunked_s", "streams' p50 inter-token gap, unchunked", 1e3, "{:.0f} ms"),
    ("p95_gap_unchunked_s", "streams' p95 inter-token gap, unchunked", 1e3, "{:.0f} ms"),
    ("ttft_unchunked_s", "time to first token, unchunked", 1e3, "{:.0f} ms"),
    ("peak_rss_mb", "peak RSS", 1, "{:.0f} MB"),
    ("matmul_tflops", "bf16 matmul rate measured", 1, "{:.0f} TFLOP/s"),
    ("vision_gflop_tile", "vision FLOPs per tile", 1, "{:.1f} GFLOP"),
    ("vision_vs_matmul", "vision per tile / its FLOPs at the matmul rate", 1, "x{:.2f}"),
    ("identical_rows", "rows with the CPU's greedy tokens", 1, "{:.2f}"),
    ("peak_gpu_mb", "peak GPU memory", 1, "{:.0f} MB"),
    ("peak_gpu_vs_card", "peak GPU memory / model card's ~1.4 GB", 1, "x{:.2f}"),
    ("cold_start_s", "cold start", 1, "{:.1f} s"),
]


def worker(args) -> None:
    """One side, one workload, in this process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sides import SIDES

    w = WORKLOADS[args.workload]
    side = SIDES[args.side](args.folder, w.dtype, args.device, w.quantize)
    if w.kind != "request":
        result = SCENARIOS[w.kind](side, w, args.reps)
        print(json.dumps(result | {"peak_rss_mb": peak_rss_mb(), "load_s": side.load_s} | peak_gpu(args.device)))
        return
    batch = conversations(w)

    cached = args.device == "cpu"

    def run():  # ours with its caches on (the default budget), emptied first: each run does all the work
        side.clear()
        return side.run(batch, w.new_tokens, w.split, cached=cached)

    cold = run()
    cold_start = time.time() - args.spawned_at - cold.total_s + cold.ttft_s  # process start -> first token
    runs = [run() for _ in range(args.reps)]
    result = {
        "preprocess_s": statistics.median(r.preprocess_s for r in runs),
        "ttft_s": statistics.median(r.ttft_s for r in runs),
        "decode_tps": statistics.median(r.decode_tps for r in runs),
        **({"decode_all_tps": w.batch * statistics.median(r.decode_tps for r in runs)} if w.batch > 1 else {}),
        "total_s": statistics.median(r.total_s for r in runs),
        "tiles": cold.tiles, "prompt_tokens": cold.prompt_tokens, "new_tokens": len(cold.token_times),
        "cold_start_s": cold_start, "load_s": side.load_s,
    }
    if w.image is not None:  # the tower alone, once (the runs above warmed it up)
        seconds, tiles = side.vision(batch, w.split)
        result["vision_tile_s"] = seconds / tiles
    result |= {"peak_rss_mb": peak_rss_mb()} | peak_gpu(args.device)
    if w.video and "peak_gpu_mb" in result:
        result["peak_gpu_vs_card"] = result["peak_gpu_mb"] / VIDEO_CARD_MB
    print(json.dumps(result))


def peak_gpu(device: str) -> dict:
    """This process's peak GPU memory (torch's allocations: weights, caches, activations), on a GPU."""
    import torch

    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if device.startswith("cuda") else {}


def peak_rss_mb() -> float:
    """This process's peak resident memory. /proc's VmHWM belongs to this process image alone; getrusage's ru_maxrss
    carries the parent's peak across fork and exec, so a bench parent that built the checkpoint would set everyone's."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quality(args) -> None:
    """Logit error of each fast path against the plain fp32 model, on the one-tile prompt; prints one JSON line."""
    import torch

    from smolvlm import Model
    from smolvlm.processing import Processor

    torch.set_num_threads(args.threads)
    w = WORKLOADS["tile"]
    inputs = Processor.from_pretrained(args.folder).apply_chat_template(
        conversations(w)[0], add_generation_prompt=True, tokenize=True, do_image_splitting=False
    )
    inputs = {k: v.to(args.device) for k, v in inputs.items()}

    def logits(**kw):
        model = Model.from_pretrained(args.folder, device=args.device, **kw)
        with torch.inference_mode():
            return model(**inputs)[0].float()

    ref = logits(dtype="float32")
    result = {}
    variants = {"fp32 fused": dict(dtype="float32", fuse=True), "bf16 fused": dict(dtype="bfloat16", fuse=True)}
    if args.device == "cpu":
        variants |= {"int8, fp32 model": dict(dtype="float32", quantize="int8"),
                     "int8, bf16 model": dict(dtype="bfloat16", quantize="int8")}
    for name, kw in variants.items():
        got = logits(**kw)
        result[name] = {
            "max_abs": (got - ref).abs().max().item(),
            "relative_l2": ((got - ref).norm() / ref.norm()).item(),
            "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        }
    result["logit_range"] = ref.abs().max().item()
    print(json.dumps(result))


def spawn(side: str, workload: str, args, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, workload, "--folder", str(folder), "--threads",
           str(args.threads), "--device", args.device, "--reps", str(args.reps), "--spawned-at"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd + [repr(time.time())], capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"ran past --timeout {args.timeout} s", "stderr": _text(e.stderr)[-3000:]}
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}", "stderr": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def ratio_cell(results, name, metric) -> str:
    ours, ref = results[name].get("ours", {}).get(metric), results[name].get("reference", {}).get(metric)
    target = TARGETS.get((name, metric))
    if target and target[2] != "reference":
        ref = results.get(target[2], {}).get("ours", {}).get(metric)
    if (name, metric) in SELF_TARGETS and ours is not None:
        bound, kind = SELF_TARGETS[name, metric]
        met = ours >= bound if kind == "min" else ours <= bound
        return f"{'≥' if kind == 'min' else '≤'}{bound} {'met' if met else 'NOT met'}"
    if ours is None or not ref:  # no baseline (the reference caches no prompt tokens: 0)
        return ""
    cell = f"x{ours / ref:.2f}"
    if target:
        bound, kind, _ = target
        met = ours / ref >= bound if kind == "min" else ours / ref <= bound
        cell += f" ({'≥' if kind == 'min' else '≤'}{bound} {'met' if met else 'NOT met'})"
    elif metric == "peak_rss_mb":
        cell += " (≤1 met)" if ours <= ref else " (≤1 NOT met)"
    return cell


def table(results: dict) -> str:
    lines = ["| workload | metric | smolvlm | reference | ours / ref |", "| --- | --- | --- | --- | --- |"]
    for name, sides in results.items():
        w = WORKLOADS[name]
        for key, label, scale, fmt in METRICS:
            cells = [fmt.format(sides[s][key] * scale) if key in sides.get(s, {}) else "-" for s in ("ours", "reference")]
            if cells == ["-", "-"]:
                continue
            tag = f"{name} ({w.dtype}{', ' + w.quantize if w.quantize else ''})"
            lines.append(f"| {tag} | {label} | {cells[0]} | {cells[1]} | {ratio_cell(results, name, key)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smolvlm2-256m", help="a shape of benchmarks/checkpoint.py")
    parser.add_argument("--folder", type=Path, help="use this checkpoint folder instead of building one")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "smolvlm-bench",
                        help="where the random checkpoint is built (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2, help="timed requests per workload and side (default: %(default)s)")
    parser.add_argument("--only", help="comma-separated workloads: " + ", ".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help=f"1 rep of {', '.join(QUICK)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-quality", action="store_true", help="skip the logit-error report of the fast paths")
    parser.add_argument("--timeout", type=float, help="seconds a worker may run before it is reported and killed")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.side, args.workload = args.worker
        return quality(args) if args.side == "quality" else worker(args)
    names = args.only.split(",") if args.only else list(QUICK if args.quick else WORKLOADS)
    if args.quick:
        args.reps = 1
    folder = args.folder
    if folder is None:
        from checkpoint import make_random_checkpoint

        folder = make_random_checkpoint(args.shape, args.cache / f"{args.shape}-bfloat16", "bfloat16")
    what = args.folder or f"{args.shape} random weights"
    print(f"# {what}, {args.device}, {args.threads} threads, {args.reps} reps, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.device.startswith("cuda"):
        TARGETS.update(GPU_TARGETS)
    results, errors = {}, None

    def save():
        if args.json:
            dump = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "logit_errors": errors}
            args.json.write_text(json.dumps(dump, indent=1))

    for name in names:
        for side in WORKLOADS[name].sides:
            start = time.perf_counter()
            results.setdefault(name, {})[side] = r = spawn(side, name, args, folder)
            took = f"  {name:13} {side:9} {time.perf_counter() - start:5.0f} s"
            if "error" in r:
                print(f"{took}  FAILED ({r['error']}):\n{r['stderr']}", flush=True)
            else:
                print(f"{took}  ({r['prompt_tokens']} prompt tokens, {r['tiles']} tiles, {r['new_tokens']} new, "
                      f"load {r['load_s']:.1f} s)", flush=True)
            save()
    if not args.no_quality:
        errors = spawn("quality", "tile", args, folder)
        save()
    print(f"# load average at the end {os.getloadavg()[0]:.1f}\n")
    print(table(results))
    failed = [f"{name} {side}" for name, sides in results.items() for side, r in sides.items() if "error" in r]
    if errors and "error" in errors:
        failed.append("quality")
    elif errors:
        print(f"\nLogits against the plain fp32 model, one-tile prompt (largest |logit| {errors['logit_range']:.1f}):")
        print("| variant | max abs error | relative L2 error | top-1 agreement |\n| --- | --- | --- | --- |")
        for name, e in errors.items():
            if name != "logit_range":
                print(f"| {name} | {e['max_abs']:.4f} | {e['relative_l2']:.4f} | {e['top1_agreement']:.3f} |")
    identity_rows = results.get("fp32-identity", {}).get("ours", {}).get("first_divergence")
    if identity_rows is not None:
        print(f"\nfp32-identity: first differing token of each row (None: identical): {identity_rows}")
    if failed:
        raise SystemExit(f"\nFailed: {', '.join(failed)} (their errors are above and in --json)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
