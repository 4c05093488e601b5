"""The scenario workloads of benchmarks/bench.py (a `Workload.kind` other than "request"): multi-turn chats, shared
images, streams joined by a long request, the vision tower against the matmul rate, fp32 identity with the CPU.
Each takes a side (sides.py), its workload and the repetitions, and returns its metrics."""

from __future__ import annotations

import statistics
import time

from workloads import IMAGE_PROMPT, PROMPT, QUESTIONS, WORKLOADS, Workload, conversations, photo, user


def chat(side, w: Workload, reps: int) -> dict:
    """3 turns about one photo, each resending the conversation (the answers as the side gave them); a warm-up
    request first (another photo), then `reps` chats, each about a new photo."""
    side.run([[user(IMAGE_PROMPT, photo(*w.image, seed=99))]], w.new_tokens, w.split, cached=True)
    chats = []
    for rep in range(reps):
        history, turns = [], []
        for i, question in enumerate(QUESTIONS[:3]):
            history.append(user(question, photo(*w.image, seed=rep) if i == 0 else None))
            t = side.run([history], w.new_tokens, w.split, cached=True)
            history.append({"role": "assistant", "content": [{"type": "text", "text": t.text.strip()}]})
            turns.append(t)
        chats.append(turns)
    median = lambda f: statistics.median(f(turns) for turns in chats)  # noqa: E731
    return {
        "ttft_s": median(lambda t: t[0].ttft_s), "ttft_turn2_s": median(lambda t: t[1].ttft_s),
        "ttft_turn3_s": median(lambda t: t[2].ttft_s), "cached_turn3": median(lambda t: t[2].cached_tokens),
        "turn2_vs_turn1": median(lambda t: t[1].ttft_s / t[0].ttft_s),
        "turn3_vs_turn1": median(lambda t: t[2].ttft_s / t[0].ttft_s),
        "tiles": chats[0][0].tiles, "prompt_tokens": chats[0][2].prompt_tokens, "new_tokens": w.new_tokens,
    }


def shared(side, w: Workload, reps: int) -> dict:
    """8 questions about one photo as one batch call, caches off (today's engine) and on (emptied before each)."""
    side.run([[user(IMAGE_PROMPT)]], 4, False)  # warm-up
    batch = [[user(q, photo(*w.image, seed=0))] for q in QUESTIONS[: w.batch]]
    off, on = [], []
    for _ in range(reps):
        off.append(side.run(batch, w.new_tokens, w.split))
        side.clear()
        on.append(side.run(batch, w.new_tokens, w.split, cached=True))
    total_on, total_off = statistics.median(t.total_s for t in on), statistics.median(t.total_s for t in off)
    return {"total_s": total_on, "total_uncached_s": total_off, "cached_vs_uncached": total_on / total_off,
            "tiles": off[0].tiles, "prompt_tokens": off[0].prompt_tokens, "new_tokens": w.new_tokens}


def join(side, w: Workload, reps: int) -> dict:
    """7 text streams decoding; once each has 4 tokens the photo request joins. The streams' gaps between tokens
    from then to their end, with chunked prefill (the engine's default) and without (prefill_chunk=None)."""
    from smolvlm.generation import SamplingParams

    streams = side._prompts([[user(PROMPT)]] * (w.batch - 1), False)
    long = side._prompts([[user(IMAGE_PROMPT, photo(*w.image, seed=0))]], w.split)[0]
    stream_tokens = 64
    result = {}
    for name, chunk in (("", {}), ("_unchunked", {"prefill_chunk": None})):
        engine = side.engine(w.batch, len(long) + w.new_tokens, **chunk)
        gaps, ttfts = [], []
        for _ in range(reps + 1):  # the first one warms up
            ids = [engine.add_request(p, SamplingParams(max_new_tokens=stream_tokens)) for p in streams]
            times, long_id, start = {i: [] for i in ids}, None, None
            while engine.has_unfinished():
                outputs = engine.step()
                now = time.perf_counter()
                for out in outputs:
                    if out.request_id in times:
                        times[out.request_id].append(now)
                    elif out.request_id == long_id and ttft is None:
                        ttft = now - start
                if long_id is None and min(len(t) for t in times.values()) >= 4:
                    long_id, start, ttft = engine.add_request(long, SamplingParams(max_new_tokens=w.new_tokens)), now, None
            gaps.append([b - a for t in times.values() for a, b in zip(t[3:], t[4:])])
            ttfts.append(ttft)
        all_gaps = sorted(g for run in gaps[1:] for g in run)
        q = statistics.quantiles(all_gaps, n=20)
        result |= {f"max_gap{name}_s": max(all_gaps), f"p50_gap{name}_s": statistics.median(all_gaps),
                   f"p95_gap{name}_s": q[18], f"ttft{name}_s": statistics.median(ttfts[1:])}
    return result | {"tiles": long.pixel_values.shape[0], "prompt_tokens": len(long), "new_tokens": w.new_tokens}


def vision_flops(config) -> float:
    """FLOPs of one tile through the vision tower and connector (matmuls, attention, patch embedding)."""
    v = config.vision_config
    patches, d = (v.image_size // v.patch_size) ** 2, v.hidden_size
    layer = 2 * patches * d * (4 * d + 2 * v.intermediate_size) + 4 * patches * patches * d  # q/k/v/o, MLP; QK^T, PV
    embed = 2 * patches * 3 * v.patch_size**2 * d
    connector = 2 * patches * d * config.text_config.hidden_size  # pixel shuffle keeps patches * d values
    return v.num_hidden_layers * layer + embed + connector


def matmul_tflops(device: str) -> float:
    """The device's bf16 matmul rate on square products (8192^3 on a GPU; 1024^3 on a CPU, to stay short)."""
    import torch

    from sides import _sync

    n, iters = (8192, 20) if device.startswith("cuda") else (1024, 3)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(torch.device(device))
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(torch.device(device))
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def vision(side, w: Workload, reps: int) -> dict:
    """The tower (and connector) alone on `w.batch` random tiles in one call: a warm-up, then `reps` timed; against
    the time its FLOPs take at the matmul rate measured here."""
    import torch

    from sides import timed_encode

    config, rate = side.model.config, matmul_tflops(str(side.device))
    size = config.vision_config.image_size
    pixels = torch.rand(1, w.batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    masks = torch.ones(1, w.batch, size, size, dtype=torch.long)
    timed_encode(side, pixels, masks)
    tile_s = statistics.median(timed_encode(side, pixels, masks) for _ in range(reps)) / w.batch
    flops = vision_flops(config)
    return {"vision_tile_s": tile_s, "matmul_tflops": rate, "vision_gflop_tile": flops / 1e9,
            "vision_vs_matmul": tile_s / (flops / (rate * 1e12)), "tiles": w.batch, "prompt_tokens": 0, "new_tokens": 0}


def identity(side, w: Workload, reps: int) -> dict:
    """Greedy tokens of the side's device against the CPU's, same model and dtype: text and one-tile rows, one batch.
    cuDNN may run fp32 convolutions (the patch embedding) in TF32 by torch's default; it is turned off here, so fp32
    means IEEE fp32 on both."""
    import torch

    from smolvlm.generation import SamplingParams

    torch.backends.cudnn.allow_tf32 = False
    batch = conversations(WORKLOADS["text"])[:1] + [[user(PROMPT[:40])]]
    batch += [[user(q, photo(512, 512, seed=i))] for i, q in enumerate(QUESTIONS[: w.batch])]
    cpu = type(side)(side.folder, w.dtype, "cpu", None)
    rows = []
    for s in (side, cpu):
        prompts = s._prompts(batch, False)
        engine = s.engine(len(prompts), max(len(p) for p in prompts) + w.new_tokens)
        rows.append([r.token_ids for r in engine.generate(prompts, SamplingParams(max_new_tokens=w.new_tokens))])
    diverge = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(*rows)]
    return {"identical_rows": sum(d is None for d in diverge) / len(batch), "first_divergence": diverge,
            "tiles": w.batch, "prompt_tokens": max(len(p) for p in prompts), "new_tokens": w.new_tokens}


SCENARIOS = {"chat": chat, "shared": shared, "join": join, "vision": vision, "identity": identity}
