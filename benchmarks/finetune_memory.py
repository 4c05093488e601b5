"""Peak memory and step time of one QLoRA training step vs one LoRA bf16 step at the SmolVLM2-2.2B shape.

SmolVLM2-2.2B's config is not in ../shared/checkpoint-files, but its parts are published: SigLIP so400m-patch14-384
(hidden 1152, 27 layers, 16 heads, MLP 4304, 384 px tiles, patch 14) and SmolLM2-1.7B (hidden 2048, 24 layers, 32
heads, 32 KV heads, MLP 8192), vocabulary 49280, pixel-shuffle scale factor 3 (81 tokens per tile). The model is built
with random normal(0, 0.02) weights, layer by layer (QLoRA quantizes each layer as it is made, as loading does), with
the real tokenizer and chat template of SmolVLM2-500M. The batch: 2 conversations of one 384 px tile + 64 text tokens
(the answer's tokens carry the loss). Both sides: LoRA r=8 on the text model's projections (the default), AdamW,
gradient checkpointing, bf16 weights and compute; QLoRA holds the text, vision and connector linear layers in NF4.

Each side runs in its own subprocess. Once the model is built, freed heap is handed back to the OS (malloc_trim: the
layer-by-layer build frees every bf16 weight it quantizes) and the kernel's peak-RSS counter is reset
(/proc/self/clear_refs), so "step peak" is the process's peak resident memory over the `--steps` optimizer steps:
weights, activations, gradients, optimizer state, plus the Python/torch runtime ("runtime", the RSS before the model
was built). Step time is the last step's.

    python benchmarks/finetune_memory.py [--steps 2] [--threads N]
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


def side(kind: str, folder: Path, steps: int) -> dict:
    import torch
    from PIL import Image
    from torch import nn

    from smolvlm.config import SmolVLMConfig
    from smolvlm.model import Model
    from smolvlm.model.text import rope_inv_freq
    from smolvlm.processing import Processor
    from smolvlm.training.data import Record, collate, encode
    from smolvlm.training.lora import add_lora
    from smolvlm.training.loss import enable_gradient_checkpointing, label_count, loss_sum
    from smolvlm.training.qlora import quantize_linears

    before = rss_now()
    torch.manual_seed(0)
    config = SmolVLMConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = Model(config)

    def materialize(module: nn.Module) -> None:
        """Random bf16 weights for the module's meta parameters (norms 1, biases 0)."""
        for name, m in module.named_modules():
            for key, p in list(m.named_parameters(recurse=False)):
                if p.is_meta:
                    w = torch.empty(p.shape, dtype=torch.bfloat16)
                    if "norm" in name and key == "weight":
                        w.fill_(1.0)
                    elif key == "bias":
                        w.zero_()
                    else:
                        w.normal_(0.0, 0.02)
                    setattr(m, key, nn.Parameter(w))

    backbone = model.model
    for layer in [*backbone.text_model.layers, *backbone.vision_model.encoder.layers, backbone.connector]:
        materialize(layer)
        if kind == "qlora":
            quantize_linears(layer, torch.bfloat16)
    materialize(model)
    rotary = backbone.text_model.rotary_emb
    rotary.inv_freq = rope_inv_freq(rotary.theta, rotary.head_dim)
    if kind == "qlora":
        model.requires_grad_(False)
        model.is_loaded_in_4bit = True
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
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    built = rss_now()
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
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 2**20  # KiB
    return {"side": kind, "tokens": int(batch["attention_mask"].sum()), "seq": batch["input_ids"].shape[1],
            "step_peak_gib": round(peak, 3), "runtime_gib": round(before, 3), "model_gib": round(built - before, 3),
            "step_s": round(times[-1], 2),
            "loss": round(float(loss) / label_count(batch), 3)}


def rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--side", choices=["lora", "qlora"], help=argparse.SUPPRESS)  # the subprocess
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
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / "smolvlm2-2.2b-shape")
        results = {}
        for kind in ("lora", "qlora"):
            argv = [sys.executable, __file__, "--side", kind, "--folder", str(folder), "--steps", str(args.steps)]
            argv += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            results[kind] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(results[kind]), flush=True)
    lora, qlora = results["lora"], results["qlora"]
    print(f"\nSmolVLM2-2.2B shape, batch 2 x {lora['seq']} tokens (one 384 px tile + {TEXT_TOKENS} text), "
          f"{args.steps} steps, CPU")
    print("| | LoRA bf16 | QLoRA (NF4) | QLoRA / LoRA |\n|---|---|---|---|")
    for key, label in (("step_peak_gib", "step peak RSS (GiB)"), ("model_gib", "model, built (GiB)"),
                       ("runtime_gib", "Python + torch before the model (GiB)"), ("step_s", "step time (s)")):
        print(f"| {label} | {lora[key]:.2f} | {qlora[key]:.2f} | {qlora[key] / lora[key]:.2f}x |")


if __name__ == "__main__":
    main()
