"""smolvlm against llama.cpp on this machine, side by side in one run (issue #21).

llama.cpp is built from the `llama_cpp_python` sdist on PyPI (its `vendor/llama.cpp`, cmake, native CPU flags) and
cached in ~/.cache/smolvlm/llamacpp, with the GGUF files its own `convert_hf_to_gguf.py` makes from the benchmark's
random-weight checkpoint (benchmarks/checkpoint.py): the text model in f16 and q8_0, and the mmproj in f16. Needs
cmake, ninja and a C++ compiler (it stops with a message when they are missing); the first run builds for ~10-20
minutes on 2 cores. Never part of the tests.

Each round runs every workload on both sides in fresh processes, alternating; the table gives the medians over the
rounds and the ratio ours / llama.cpp. Our side is benchmarks/bench.py's worker (the same workloads as its table);
llama.cpp's are `llama-bench` (text: decode tok/s of 128 new tokens after a 31-token prompt) and `llama-mtmd-cli`
(the 1536x1024 photo at the checkpoint's tiling, 13 tiles on both sides, 64 new tokens, greedy: the times it prints
with --perf; time to first token = its slices' encoding + its prompt evaluation). Peak RSS is each process's own
(wait4's ru_maxrss), and `import torch` alone is measured too, the floor of any torch process. It also prints each
decode step's memory-read floor: the bytes of weights a batch-1 step reads over this machine's read bandwidth, against
our step. Both engines' threads spin-wait between parallel sections, so on a machine busy with other work each side
slows by 10-100x at random: run it on a quiet machine.

    python benchmarks/llamacpp.py                 # 3 rounds, 2 threads
    python benchmarks/llamacpp.py --rounds 1 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST = "llama_cpp_python==0.3.36"
SENTENCEPIECE = "sentencepiece==0.2.3"  # convert_hf_to_gguf.py imports it before falling back to tokenizer.json
CACHE = Path.home() / ".cache" / "smolvlm" / "llamacpp"
TARGETS = ("llama-bench", "llama-mtmd-cli")
NEW_TOKENS_TEXT, NEW_TOKENS_IMAGE = 128, 64


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if out.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return out


def source() -> Path:
    """The llama.cpp source tree of the sdist, downloaded and unpacked once."""
    name = SDIST.replace("==", "-")
    tree = CACHE / name / "vendor" / "llama.cpp"
    if not tree.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", CACHE])
        with tarfile.open(CACHE / f"{name}.tar.gz") as tar:
            tar.extractall(CACHE, filter="data")
    return tree


def build() -> Path:
    """The folder of the built llama.cpp binaries (built once, native flags)."""
    tree = source()
    bin_dir = tree / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    missing = [tool for tool in ("cmake", "ninja", "c++") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"Building llama.cpp needs {', '.join(missing)} on PATH (apt-get install cmake ninja-build g++)")
    print(f"# building llama.cpp in {tree / 'build'} (once; 10-20 minutes on 2 cores)", flush=True)
    sh(["cmake", "-S", tree, "-B", tree / "build", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
    sh(["cmake", "--build", tree / "build", "-j", str(os.cpu_count()), "--target", *TARGETS])
    return bin_dir


def convert(folder: Path, tree: Path) -> dict[str, Path]:
    """text-f16, text-q8_0 and mmproj-f16 GGUF files of `folder`, made by llama.cpp's converter (cached)."""
    out = CACHE / "gguf" / folder.name
    files = {"text-f16": ("--outtype", "f16"), "text-q8_0": ("--outtype", "q8_0"),
             "mmproj-f16": ("--mmproj", "--outtype", "f16")}
    paths = {name: out / f"{name}.gguf" for name in files}
    pylib = CACHE / "pylib"
    if not (pylib / "sentencepiece").is_dir():
        sh([sys.executable, "-m", "pip", "install", "-q", "--target", pylib, SENTENCEPIECE])
    env = {**os.environ, "PYTHONPATH": f"{tree / 'gguf-py'}{os.pathsep}{pylib}"}
    out.mkdir(parents=True, exist_ok=True)
    for name, flags in files.items():
        if not paths[name].is_file():
            sh([sys.executable, tree / "convert_hf_to_gguf.py", folder, *flags, "--outfile", paths[name]], env=env)
    return paths


def measured(cmd: list) -> tuple[str, str, float]:
    """Run `cmd`; its stdout, its stderr, and its peak RSS in MB (its own: wait4 on this child)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{(stdout + stderr)[-3000:]}")
    return stdout, stderr, usage.ru_maxrss / 1024


def llama_text(bin_dir: Path, gguf: Path, threads: int, prompt_tokens: int) -> dict:
    # -v: without it this build's llama-bench crashed at exit; --repack 0: its AMX repacking of q8_0 weights crashes
    # on AMX CPUs (ggml_backend_amx_mul_mat), and f16 decodes at the same speed either way.
    output, _, rss = measured([bin_dir / "llama-bench", "-v", "-m", gguf, "-t", threads, "-p", prompt_tokens,
                               "-n", NEW_TOKENS_TEXT, "-r", 1, "--repack", 0, "-o", "json"])
    rows = json.loads(output)
    decode = next(r for r in rows if r["n_gen"] > 0)
    return {"decode_tps": decode["avg_ts"], "peak_rss_mb": rss}


def llama_image(bin_dir: Path, paths: dict, image: Path, prompt: str, threads: int) -> dict:
    stdout, stderr, rss = measured([bin_dir / "llama-mtmd-cli", "-m", paths["text-f16"], "--mmproj",
                                    paths["mmproj-f16"], "--image", image, "-p", prompt, "-n", NEW_TOKENS_IMAGE,
                                    "-t", threads, "--temp", 0, "--ignore-eos", "--perf",
                                    "-lv", 4])  # -lv 4: libllama's timings are logged as "trace"
    output = stdout + stderr

    def times(pattern):
        return [float(x) for x in re.findall(pattern, output)]

    slices = times(r"mtmd batch encoding done in (\d+) ms")  # one line per image slice
    prompt_ms = times(r"prompt eval time =\s+([\d.]+) ms")  # the prompt's text and image embeddings through the LM
    decode = re.search(r"\beval time =\s+[\d.]+ ms /\s+\d+ runs .*?([\d.]+) tokens per second", output)
    if not slices or decode is None:
        raise SystemExit(f"llama-mtmd-cli printed no timings this script knows:\n{output[-3000:]}")
    return {"vision_tile_s": statistics.mean(slices) / 1e3, "tiles": len(slices),
            "ttft_s": (sum(slices) + sum(prompt_ms)) / 1e3,
            "decode_tps": float(decode.group(1)), "peak_rss_mb": rss}


# The memory-read floor of a batch-1 decode step: the bytes of the text decoder's and lm_head's weights as our kernels
# hold them (packed bf16, or int8 with its scales), over the machine's read bandwidth measured here (a 1 GiB tensor
# summed by the same threads; best of 5).
FLOOR = """
import sys, time, torch
from smolvlm import Model
from smolvlm.model.fast import FastLinear
torch.set_num_threads(int(sys.argv[3]))
model = Model.from_pretrained(sys.argv[1], dtype=torch.bfloat16, fuse=True, quantize=sys.argv[2] or None)
heads = [model.lm_head] + [m for m in model.model.text_model.modules() if isinstance(m, FastLinear)]
weight_bytes = sum(m.weight.nbytes + m.scale.nbytes for m in heads)
del model
x = torch.ones(2**28)
times = []
for _ in range(6):
    start = time.perf_counter()
    x.sum()
    times.append(time.perf_counter() - start)
print(weight_bytes, x.nbytes / min(times[1:]))
"""


def decode_floor_ms(folder: Path, quantize: str, threads: int) -> tuple[float, float]:
    """(weight bytes a decode step reads in MB, their read time at the measured bandwidth in ms)."""
    weight_bytes, bandwidth = map(float, sh([sys.executable, "-c", FLOOR, folder, quantize, threads]).stdout.split())
    return weight_bytes / 1e6, weight_bytes / bandwidth * 1e3


def torch_floor_mb() -> float:
    code = "import torch; print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    return int(sh([sys.executable, "-c", code]).stdout) / 1024


ROWS = [  # (label, our workload, llama.cpp key, metric, unit scale, format)
    ("text, 128 new: decode tok/s, bf16 vs f16", "text", "text-f16", "decode_tps", 1, "{:.1f}"),
    ("text, 128 new: decode tok/s, int8 vs q8_0", "text-int8", "text-q8_0", "decode_tps", 1, "{:.1f}"),
    ("1536x1024 photo, default tiling, 64 new: time to first token", "photo", "image", "ttft_s", 1, "{:.2f} s"),
    ("vision per tile (llama.cpp: mmproj f16)", "photo", "image", "vision_tile_s", 1e3, "{:.0f} ms"),
    ("decode tok/s during the image request", "photo", "image", "decode_tps", 1, "{:.1f}"),
    ("peak RSS: text bf16 vs f16", "text", "text-f16", "peak_rss_mb", 1, "{:.0f} MB"),
    ("peak RSS: text int8 vs q8_0", "text-int8", "text-q8_0", "peak_rss_mb", 1, "{:.0f} MB"),
    ("peak RSS: the photo request", "photo", "image", "peak_rss_mb", 1, "{:.0f} MB"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench
    from checkpoint import make_random_checkpoint
    from workloads import IMAGE_PROMPT, WORKLOADS, photo

    folder = make_random_checkpoint("smolvlm2-256m", Path.home() / ".cache" / "smolvlm-bench" / "smolvlm2-256m-bfloat16",
                                    "bfloat16")
    bin_dir = build()
    paths = convert(folder, source())
    image = CACHE / "photo-1536x1024.png"  # the photo workload's photo, lossless
    photo(*WORKLOADS["photo"].image, seed=0).save(image)
    worker_args = argparse.Namespace(threads=args.threads, device="cpu", reps=1, timeout=1800)
    prompt_tokens = None
    ours, theirs = {}, {}
    print(f"# {args.rounds} rounds, {args.threads} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    for round_ in range(args.rounds):
        for workload in ("text", "text-int8", "photo"):
            r = bench.spawn("ours", workload, worker_args, folder)
            ours.setdefault(workload, []).append(r)
            prompt_tokens = prompt_tokens or (r["prompt_tokens"] if workload == "text" else None)
        for key in ("text-f16", "text-q8_0"):
            theirs.setdefault(key, []).append(llama_text(bin_dir, paths[key], args.threads, prompt_tokens))
        theirs.setdefault("image", []).append(llama_image(bin_dir, paths, image, IMAGE_PROMPT, args.threads))
        print(f"  round {round_ + 1} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    floor = torch_floor_mb()
    step_floors = {w: decode_floor_ms(folder, q, args.threads) for w, q in (("text", ""), ("text-int8", "int8"))}
    print(f"\nsmolvlm ({ROOT}) against llama.cpp ({SDIST}'s vendor/llama.cpp), {args.threads} threads, medians of "
          f"{args.rounds} rounds; our text prompt {prompt_tokens} tokens (llama-bench: the same count)\n")
    print("| workload | smolvlm | llama.cpp | ours / llama.cpp |\n| --- | --- | --- | --- |")
    results = {}
    for label, mine, key, metric, scale, fmt in ROWS:
        a = statistics.median(r[metric] for r in ours[mine])
        b = statistics.median(r[metric] for r in theirs[key])
        results[label] = {"smolvlm": a, "llama.cpp": b}
        print(f"| {label} | {fmt.format(a * scale)} | {fmt.format(b * scale)} | x{a / b:.2f} |")
    tiles = theirs["image"][0]["tiles"]
    print(f"\nThe photo: llama.cpp encodes {tiles} slices, ours {ours['photo'][0]['tiles']} tiles. "
          f"`import torch` alone: {floor:.0f} MB peak RSS; ours above it: "
          + ", ".join(f"{w} {statistics.median(r['peak_rss_mb'] for r in ours[w]) - floor:.0f} MB" for w in ours))
    for w, (mb, floor_ms) in step_floors.items():
        step_ms = 1e3 / statistics.median(r["decode_tps"] for r in ours[w])
        print(f"{w}: a decode step reads {mb:.0f} MB of weights, {floor_ms:.1f} ms at this machine's read bandwidth; "
              f"our step (engine included) {step_ms:.1f} ms: floor / ours x{floor_ms / step_ms:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"ours": ours, "llama.cpp": theirs, "torch_floor_mb": floor,
                                         "step_floors": step_floors, "table": results}, indent=1))


if __name__ == "__main__":
    main()
