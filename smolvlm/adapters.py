"""LoRA adapter folders (peft's adapter_config.json + adapter_model.safetensors, as `smolvlm finetune` writes them)
loaded for inference: merged into a copy of the base model's weights (W + B @ A * alpha / r), so generation runs at the
base model's speed. The base model is the adapter's `base_model_name_or_path` unless one is given.

Each merged adapter is a whole model in memory (the 256M model: about 0.5 GB in bf16): `smolvlm serve --lora-modules`
trades that memory for zero per-token cost and no change to the engine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CheckpointError, InputError

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is a local LoRA adapter folder (rather than a checkpoint folder or a hub repo id)."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base(folder: str | os.PathLike) -> str:
    """The base model an adapter was trained from (its adapter_config.json's base_model_name_or_path)."""
    where = Path(folder) / ADAPTER_CONFIG
    try:
        base = json.loads(where.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{where}: not a readable peft adapter config ({e})") from None
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{where} names no base model (base_model_name_or_path): pass it with "
                              f"--model BASE --adapter {folder}")
    return base


def require_peft(what: str):
    """The peft module, or an InputError naming the extra that installs it (it is not an inference dependency)."""
    try:
        import peft
    except ImportError:
        raise InputError(f"{what} with peft, which is not installed: pip install 'smolvlm[train]'") from None
    return peft


def merge_adapter(model, folder: str | os.PathLike):
    """`model` (unfused, on its device and dtype) with the adapter in `folder` merged into its weights."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{folder} is not a LoRA adapter folder: it has no {ADAPTER_CONFIG}")
    peft = require_peft("LoRA adapters are loaded")
    try:
        return peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError, OSError) as e:  # a different base, rank or target modules
        raise CheckpointError(f"Can't apply the LoRA adapter {folder} to this model: {str(e).splitlines()[0]:.300} "
                              "(is it the adapter's base model?)") from None
