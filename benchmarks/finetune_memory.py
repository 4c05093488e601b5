"""Memory of QLoRA vs LoRA bf16 at the SmolVLM2-2.2B shape: loading the base, and one training step (with step time).

SmolVLM2-2.2B's config is not in ../shared/checkpoint-files, but its parts are published: SigLIP so400m-patch14-384
(hidden 1152, 27 layers, 16 heads, MLP 4304, 384 px tiles, patch 14) and SmolLM2-1.7B (hidden 2048, 24 layers, 32
heads, 32 KV heads, MLP 8192), vocabulary 49280, pixel-shuffle scale factor 3 (81 tokens per tile). The benchmark
writes a checkpoint of that shape with random normal(0, 0.02) bf16 weights (safetensors, one shard per layer), with the
real tokenizer and chat template of SmolVLM2-500M, and loads it as `finetune` does.

Load: peak and final resident memory of loading it for LoRA (bf16, the weights stay mapped from the file), for QLoRA
as `finetune --qlora` does (each linear weight read, quantized to NF4 and dropped: `qlora.load_quantized`) and as it
did before (the bf16 model loaded, then quantized).

Step: 2 conversations of one 384 px tile + 64 text tokens (the answer's tokens carry the loss). Both sides: LoRA r=8 on
the text model's projections (the default), AdamW, gradient checkpointing, bf16 weights and compute, glibc's mmap
threshold fixed before loading as `finetune` fixes it on a CPU; QLoRA holds the text, vision and connector linear
layers in NF4. Once the model is loaded, freed heap is handed back to the OS (malloc_trim) and the kernel's peak-RSS
counter is reset (/proc/self/clear_refs), so "step peak" is the process's peak resident memory over the `--steps`
optimizer steps: weights, activations, gradients, optimizer state, plus the Python/torch runtime ("runtime", the RSS
before the model was loaded; peft, which both sides import, adds ~0.24 GiB more). Step time is the last step's.

Each measurement runs in its own subprocess, one after the other.

    python benchmarks/finetune_memory.py [--steps 2] [--threads N] [--only load|step|qlora|...]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT.parent / "shared" / "checkpoint-files" / "SmolVLM2-500M-Video-Instruct"
TEXT_TOKENS = 64


def write_folder(folder: Path) -> Path:
    """config.json of the 2.2B shape + SmolVLM2-500M's tokenizer/processor files set to one unsplit 384 px tile."""
    config = json.loads((FILES / "config.json").read_text())
    config.update(scale_factor=3, torch_dtype="bfloat16", tie_word_embeddings=False)
    config["text_config"].update(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                                 intermediate_size=8192, head_dim=64, vocab_size=49280, tie_word_embeddings=False)
    config["vision_config"].update(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                                   intermediate_size=4304, image_size=384, patch_size=14,
                                   max_image_size={"longest_edge": 384})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for f in FILES.iterdir():
        if f.name != "config.json":
            shutil.copyfile(f, folder / f.name)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre.update(size={"longest_edge": 384}, max_image_size={"longest_edge": 384}, do_image_splitting=False)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    proc = json.loads((folder / "processor_config.json").read_text())
    proc["image_seq_len"] = 81  # (384 / 14 = 27 patches per side / scale factor 3) ** 2
    (folder / "processor_config.json").write_text(json.dumps(proc))
    return folder


def write_weights(folder: Path) -> None:
    """Random bf16 weights for the config in `folder` (normal(0, 0.02); norms 1, biases 0), one safetensors shard per
    layer plus an index, so writing them never holds the whole model."""
    import torch
    from safetensors.torch import save_file

    from smolvlm.config import SmolVLMConfig
    from smolvlm.model import Model

    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Model(SmolVLMConfig.from_pretrained(folder)).state_dict().items()}
    shards: dict[str, list[str]] = {}
    for key in shapes:
        parts = key.split(".")
        layer = next((i for i, p in enumerate(parts) if p == "layers"), None)
        shards.setdefault(".".join(parts[: layer + 2]) if layer is not None else "rest", []).append(key)
    weight_map = {}
    for i, keys in enumerate(shards.values()):
        name = f"model-{i:05d}.safetensors"
        tensors = {}
        for key in keys:
            w = torch.empty(shapes[key], dtype=torch.bfloat16)
            tensors[key] = w.fill_(1.0) if "norm" in key and key.endswith("weight") else \
                w.zero_() if key.endswith("bias") else w.normal_(0.0, 0.02)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def load(kind: str, folder: Path):
    """The model as `finetune` loads it: bf16 (LoRA), quantized while read (QLoRA), or -- what --qlora did before --
    the whole bf16 model loaded, then quantized ("qlora-after-bf16")."""
    import torch

    from smolvlm.model import Model
    from smolvlm.training.qlora import QUANTIZED_PARTS, load_quantized, quantize_linears

    if kind == "qlora":
        return load_quantized(folder, torch.bfloat16, torch.device("cpu"))
    model = Model.from_pretrained(folder, dtype=torch.bfloat16)
    if kind == "qlora-after-bf16":
        for part in QUANTIZED_PARTS:
            quantize_linears(getattr(model.model, part), torch.bfloat16)
        model.requires_grad_(False)
        model.is_loaded_in_4bit = True
    return model


def side(kind: str, folder: Path, steps: int) -> dict:
    import ctypes
    import gc

    import torch
    from PIL import Image

    from smolvlm.processing import Processor
    from smolvlm.training.data import Record, collate, encode
    from smolvlm.training.lora import add_lora
    from smolvlm.training.loss import enable_gradient_checkpointing, label_count, loss_sum
    from smolvlm.weights import return_large_frees_to_os

    return_large_frees_to_os()  # what Model.from_pretrained does on a CPU before it loads (the reference side too)
    before = rss_now()
    began = time.perf_counter()
    model = load(kind.removeprefix("load-"), folder)
    load_s = time.perf_counter() - began
    load_peak = peak_rss()
    if kind.startswith("load"):
        return {"side": kind, "load_peak_gib": round(load_peak, 3), "loaded_gib": round(rss_now(), 3),
                "mapped_file_gib": round(status_kib("RssFile") / 2**20, 3),
                "runtime_gib": round(before, 3), "load_s": round(load_s, 1)}
    torch.manual_seed(0)
    add_lora(model, r=8, alpha=16, dropout=0.05, targets=("text",), base="random")
    enable_gradient_checkpointing(model)
    model.train()

    processor = Processor.from_pretrained(folder)
    image = Image.new("RGB", (384, 384), (120, 80, 200))
    words = " ".join(["word"] * 200)
    question = processor.tokenizer.decode(processor.tokenizer.encode(words).ids[: TEXT_TOKENS - 24])
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": "A purple square."}]
    text = processor.apply_chat_template(messages, add_generation_prompt=False)
    prompt = processor.apply_chat_template(messages[:1], add_generation_prompt=True)
    example = encode(Record("bench", text, [(len(prompt), len(text))], [image], []), processor)
    batch = collate([example, example], processor.pad_token_id)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    weights = sum(t.nbytes for t in [*model.parameters(), *model.buffers()]) + sum(
        t.nbytes for p in model.parameters() if (q := getattr(p, "quant_state", None))  # the NF4 scales
        for t in (q.absmax, q.code, q.state2.absmax, q.state2.code))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        loss, _ = loss_sum(model, batch)
        (loss / label_count(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    return {"side": kind, "tokens": int(batch["attention_mask"].sum()), "seq": batch["input_ids"].shape[1],
            "step_peak_gib": round(peak_rss(), 3), "runtime_gib": round(before, 3), "weights_gib": round(weights / 2**30, 3),
            "step_s": round(times[-1], 2), "loss": round(float(loss.detach()) / label_count(batch), 3)}


def peak_rss() -> float:
    """The process's peak resident memory in GiB."""
    return status_kib("VmHWM") / 2**20


def status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


def rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


LOADS = ("load-lora", "load-qlora-after-bf16", "load-qlora")
STEPS = ("lora", "qlora")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=["load", "step", *LOADS, *STEPS],
                        help="only the load or only the step comparison, or one measurement (e.g. qlora)")
    parser.add_argument("--side", choices=LOADS + STEPS, help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(side(args.side, Path(args.folder), args.steps)))
        return
    if not FILES.is_dir():
        raise SystemExit(f"needs the real tokenizer files at {FILES}")
    kinds = {"load": LOADS, "step": STEPS, None: LOADS + STEPS}.get(args.only, (args.only,))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / "smolvlm2-2.2b-shape")
        write_weights(folder)
        r = {}
        for kind in kinds:
            argv = [sys.executable, __file__, "--side", kind, "--folder", str(folder), "--steps", str(args.steps)]
            argv += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            r[kind] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(r[kind]), flush=True)
    if all(k in r for k in LOADS):
        lora, before, after = (r[k] for k in LOADS)
        print("\nLoading the SmolVLM2-2.2B shape (bf16 safetensors shards), CPU")
        print("| | LoRA: bf16 | QLoRA: bf16, then quantized | QLoRA: quantized while read |\n|---|---|---|---|")
        for key, label in (("load_peak_gib", "load peak RSS (GiB)"), ("loaded_gib", "RSS once loaded (GiB)"),
                           ("load_s", "load time (s)")):
            print(f"| {label} | {lora[key]:.2f} | {before[key]:.2f} | {after[key]:.2f} |")
    if all(k in r for k in STEPS):
        lora, qlora = r["lora"], r["qlora"]
        print(f"\nSmolVLM2-2.2B shape, batch 2 x {lora['seq']} tokens (one 384 px tile + {TEXT_TOKENS} text), "
              f"{args.steps} steps, CPU")
        print("| | LoRA bf16 | QLoRA (NF4) | QLoRA / LoRA |\n|---|---|---|---|")
        for key, label in (("step_peak_gib", "step peak RSS (GiB)"), ("weights_gib", "weights (GiB)"),
                           ("runtime_gib", "Python + torch before the model (GiB)"), ("step_s", "step time (s)")):
            print(f"| {label} | {lora[key]:.2f} | {qlora[key]:.2f} | {qlora[key] / lora[key]:.2f}x |")


if __name__ == "__main__":
    main()
