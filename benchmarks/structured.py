"""Structured output's cost: decode tok/s with a JSON-schema constraint against the same requests without one, at
batch 1 and 8, in one process; and the schema compile time (cold and cached).

The model is a random-weight checkpoint of a released shape (benchmarks/checkpoint.py). Its near-uniform logits
make the constrained answers spend most tokens inside strings, where the most tokens are allowed and the mask is
the dearest to compute; every answer runs to --new-tokens (the schema's strings are long enough). Constrained and
plain runs alternate, so a loaded machine slows both alike; the table gives medians.

    python benchmarks/structured.py                     # smolvlm2-256m bf16, 2 threads, CPU
    python benchmarks/structured.py --reps 5 --new-tokens 64 --quantize int8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SCHEMA = {  # a receipt: nested objects, an array with bounds, enums, bounded numbers, pattern and free strings
    "type": "object",
    "properties": {
        "shop": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 400},
                                                  "city": {"type": "string", "maxLength": 400}},
                 "required": ["name", "city"], "additionalProperties": False},
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "items": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 400},
                                             "price": {"type": "number", "minimum": 0, "maximum": 10000},
                                             "kind": {"enum": ["food", "drink", "other"]}},
            "required": ["name", "price", "kind"], "additionalProperties": False}},
        "paid": {"type": "boolean"},
    },
    "required": ["shop", "date", "items", "paid"], "additionalProperties": False,
}  # fmt: skip
PROMPT = "Read this receipt and give its fields as JSON."


def decode_tps(engine, params, batch: int) -> float:
    """Per-row decode tok/s of one batch: the steps after the prefill step, timed."""
    from smolvlm.generation import prepare

    prompts = [prepare(engine.processor, [{"role": "user", "content": f"{PROMPT} ({i})"}]) for i in range(batch)]
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # prefill: every request's first token
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smolvlm2-256m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument("--folder", default="/tmp/smolvlm-bench/smolvlm2-256m-bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from checkpoint import make_random_checkpoint

    import smolvlm
    from smolvlm.generation import Engine, SamplingParams
    from smolvlm.generation.constraints import Grammar, Grammars

    folder = make_random_checkpoint(args.shape, args.folder, args.dtype)
    vlm = smolvlm.load(folder, device="cpu", progress=False, quantize=args.quantize)

    start = time.perf_counter()
    grammars = Grammars(vlm.processor.tokenizer.to_str(), tuple(vlm.end_ids))
    tokenizer_s = time.perf_counter() - start
    compile_s, logits = [], torch.zeros(1, vlm.model.config.text_config.vocab_size)
    for i in range(5):  # a new schema each time (another maxItems): never from the cache
        schema = {**SCHEMA, "properties": {**SCHEMA["properties"], "items": {**SCHEMA["properties"]["items"],
                                                                             "maxItems": 20 + i}}}
        start = time.perf_counter()  # compile, and the first mask (llguidance builds its lexer states lazily)
        grammars.mask(logits, [grammars.matcher(Grammar.json_schema(schema))])
        compile_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    grammars.matcher(Grammar.json_schema(SCHEMA))
    grammars.matcher(Grammar.json_schema(SCHEMA))
    cached_s = time.perf_counter() - start

    engine = Engine(vlm.model, vlm.processor, vlm.end_ids, max_batch=8, max_len=512)
    end_ids, engine.end_ids = engine.end_ids, frozenset()  # every plain answer runs to --new-tokens too
    plain = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    constrained = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, grammar=Grammar.json_schema(SCHEMA))
    rows = []
    for batch in (1, 8):
        decode_tps(engine, plain, batch)  # warm-up
        engine.end_ids = end_ids  # constrained: the grammar decides where an end token may go
        decode_tps(engine, constrained, batch)
        times = {"plain": [], "json schema": []}
        for _ in range(args.reps):
            engine.end_ids = frozenset()
            times["plain"].append(decode_tps(engine, plain, batch))
            engine.end_ids = end_ids
            times["json schema"].append(decode_tps(engine, constrained, batch))
        free, bound = statistics.median(times["plain"]), statistics.median(times["json schema"])
        rows.append(f"| batch {batch} | {free:.1f} | {bound:.1f} | x{bound / free:.2f} "
                    f"({'met' if bound / free >= 0.85 else 'NOT met'}: ≥0.85) |")

    model = f"{args.shape} {args.dtype}" + (" int8" if args.quantize else "")
    print(f"{model}, {args.threads} threads, {args.new_tokens} new tokens, median of {args.reps}")
    print("| decode tok/s per row | no constraint | JSON schema | ratio |\n| --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\nschema compile + first mask: {1e3 * statistics.median(compile_s):.1f} ms (new schema, median of 5); "
          f"{1e3 * cached_s / 2:.2f} ms cached (a request's matcher); tokenizer set-up once: {tokenizer_s:.2f} s")


if __name__ == "__main__":
    main()
