"""LoRA adapters through `peft`, on the module names of the released checkpoints.

Our module tree is the reference's, so the adapters (peft's adapter_config.json + adapter_model.safetensors) load with
`peft.PeftModel.from_pretrained` onto transformers' SmolVLM as well as onto ours. peft (the `train` extra; it imports
transformers) is imported only when LoRA is used: here, and in smolvlm/adapters.py to load adapters.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters import merge_adapter, require_peft
from ..model import Model

# Which linear layers each --lora-targets name adapts (peft matches the regex against the full module name).
TARGETS = {
    "text": r"model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "connector": r"model\.connector\.modality_projection\.proj",
    "vision": r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",
}


def add_lora(model: Model, r: int, alpha: float, dropout: float, targets: tuple[str, ...], base: str):
    """Freeze `model` and wrap it with LoRA adapters (in place: `model`'s own forward then runs through them).

    Returns the peft model, which saves and merges the adapters. `base` is recorded as base_model_name_or_path.
    """
    peft = require_peft("LoRA fine-tuning runs")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules="|".join(f"(?:{TARGETS[t]})" for t in targets))
    model.name_or_path = base  # what peft records as the adapter's base_model_name_or_path
    return peft.get_peft_model(model, config)


def save_adapter(peft_model, folder: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's format) into `folder`."""
    peft_model.save_pretrained(str(folder))


def merge(peft_model) -> Model:
    """The plain `Model` with the adapters folded into its weights (W + B @ A * alpha / r)."""
    return peft_model.merge_and_unload()



def merged_onto(base: Path, adapter: Path) -> Model:
    """The adapter in `adapter` loaded onto the plain `base` checkpoint (in its own dtype) and merged."""
    return merge_adapter(Model.from_pretrained(base), adapter)
