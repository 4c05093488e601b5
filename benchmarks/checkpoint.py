"""Random-weight checkpoints of the exact released shapes, built from the real config files.

The released weights can't be downloaded here, so benchmarks and the demo use checkpoints of the real shapes with
seeded random weights: the real config.json, tokenizer, chat template and processor settings of a released model
from ../shared/checkpoint-files/, and a model.safetensors of normal(0, 0.02) weights (the reference's init std).
The text such a model writes is gibberish; its speed and memory are the real model's.

    python benchmarks/checkpoint.py smolvlm2-256m /tmp/smolvlm2-256m [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from smolvlm.config import SmolVLMConfig
from smolvlm.model import Model

CHECKPOINT_FILES = Path(__file__).resolve().parents[1].parent / "shared" / "checkpoint-files"
V1_256M = CHECKPOINT_FILES / "SmolVLM-256M-Instruct"
V2_500M = CHECKPOINT_FILES / "SmolVLM2-500M-Video-Instruct"
PROCESSOR_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
]  # fmt: skip


def _smolvlm2_256m_config() -> dict:
    """SmolVLM2-256M-Video-Instruct: the 256M shapes (SigLIP 768/12, SmolLM2 576/30, 9/3 heads) in the v2 format."""
    config = json.loads((V1_256M / "config.json").read_text())
    config.update(model_type="smolvlm", architectures=["SmolVLMForConditionalGeneration"], torch_dtype="float32")
    config["vision_config"]["model_type"] = "smolvlm_vision"
    return config


# shape name -> (config.json as a dict, folder whose tokenizer/processor files go with it)
SHAPES = {
    "smolvlm-256m": (lambda: json.loads((V1_256M / "config.json").read_text()), V1_256M),
    "smolvlm2-256m": (_smolvlm2_256m_config, V2_500M),
    "smolvlm2-500m": (lambda: json.loads((V2_500M / "config.json").read_text()), V2_500M),
}


def make_random_checkpoint(shape: str, out: str | Path, dtype: str = "float32", seed: int = 0) -> Path:
    """Write a complete checkpoint folder of `shape` with seeded random weights to `out`; return it.
    Reuses `out` if it already holds this shape and dtype."""
    if not CHECKPOINT_FILES.is_dir():
        raise SystemExit(f"The real checkpoint files are not at {CHECKPOINT_FILES}; they are needed for the real shapes")
    make_config, files = SHAPES[shape]
    out = Path(out)
    stamp = out / ".random-checkpoint"
    if stamp.is_file() and stamp.read_text() == f"{shape} {dtype} {seed}":
        return out
    out.mkdir(parents=True, exist_ok=True)
    config_dict = make_config()
    config_dict["torch_dtype"] = dtype
    config = SmolVLMConfig.from_dict(config_dict, source=f"{shape} config")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Model(config)
    model.to_empty(device="cpu")
    state = {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith("norm.weight") or ".layer_norm" in name or "post_layernorm.weight" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
            state[name] = p.to(getattr(torch, dtype)).contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    for name in PROCESSOR_FILES:
        shutil.copyfile(files / name, out / name)
    stamp.write_text(f"{shape} {dtype} {seed}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_random_checkpoint(args.shape, args.out, args.dtype, args.seed))


if __name__ == "__main__":
    main()
