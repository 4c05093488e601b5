"""Write a model in the released checkpoint format: model.safetensors with the HF key names, config.json, and the
processor/tokenizer files of the checkpoint it was trained from. transformers' SmolVLM classes and `smolvlm` both
load the result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..model import Model

# Files a checkpoint folder holds besides its weights and config.json, copied as they are.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "processor_config.json", "video_preprocessor_config.json", "generation_config.json")


def save_released(model: Model, folder: Path, base: Path) -> None:
    """`model`'s weights, `base`'s config.json (with the weights' dtype) and `base`'s processor files into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # as save_pretrained: the tied head is not stored
        state.pop("lm_head.weight")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    copy_processor_files(base, folder)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    dtype = str(model.dtype).removeprefix("torch.")
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    # Last: a folder with config.json is a finished model (a run killed while exporting resumes instead).
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def copy_processor_files(base: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in PROCESSOR_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, folder / name)

