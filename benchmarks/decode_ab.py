"""Decode speed of two checkouts of smolvlm (e.g. main and a branch: their C++ kernels are each built for their own
source folder) on the same checkpoint, in one run: bf16 and int8, batch 1 and 8, alternating the two sides.

    python benchmarks/decode_ab.py /work/main . --checkpoint FOLDER [--tokens 64 --reps 3 --rounds 3]

Each (side, dtype, batch) runs in fresh processes with that checkout first on sys.path, `--rounds` times alternating
the sides (so a burst of load elsewhere hits both); it prints the median decode tok/s (all rows) over the rounds'
`--reps` timed runs after one warm-up each, and the ratio of the second side to the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time, torch
from types import SimpleNamespace
from tokenizers import Tokenizer
from smolvlm import Model
from smolvlm.generation import Engine, Prompt, SamplingParams
folder, quantize = sys.argv[1], sys.argv[2] or None
batch, tokens, reps = (int(a) for a in sys.argv[3:6])
torch.set_num_threads(2)
tok = Tokenizer.from_file(folder + "/tokenizer.json")
model = Model.from_pretrained(folder, dtype=torch.bfloat16, fuse=True, quantize=quantize)
engine = Engine(model, SimpleNamespace(tokenizer=tok, pad_token_id=2), [], max_batch=batch, max_len=256)
chat = "<|im_start|>User:Tell me story number {}.<end_of_utterance>\\nAssistant:"
prompts = [Prompt(torch.tensor(tok.encode(chat.format(i)).ids)) for i in range(batch)]
params = SamplingParams(max_new_tokens=tokens)
rates = []
for rep in range(reps + 1):
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # the prefill (and first tokens)
    start, n = time.perf_counter(), 0
    while engine.has_unfinished():
        n += sum(len(o.token_ids) for o in engine.step())
    if rep:
        rates.append(n / (time.perf_counter() - start))
print(json.dumps(rates))
"""


def run(tree: Path, checkpoint: str, quantize: str, batch: int, tokens: int, reps: int) -> list[float]:
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); " + CHILD
    out = subprocess.run(
        [sys.executable, "-c", code, checkpoint, quantize, str(batch), str(tokens), str(reps)],
        capture_output=True, text=True, cwd=tree,
    )  # fmt: skip
    if out.returncode:
        sys.exit(f"{tree}: the benchmark process failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"| workload | {args.first} tok/s | {args.second} tok/s | ratio |\n| --- | --- | --- | --- |")
    for quantize in ("", "int8"):
        for batch in (1, 8):
            rates = {args.first: [], args.second: []}
            for _ in range(args.rounds):
                for tree in rates:
                    rates[tree] += run(tree.resolve(), args.checkpoint, quantize, batch, args.tokens, args.reps)
            a, b = (statistics.median(r) for r in rates.values())
            name = f"{quantize or 'bf16'}, batch {batch}"
            print(f"| {name} | {a:.1f} | {b:.1f} | x{b / a:.3f} |", flush=True)


if __name__ == "__main__":
    main()
