"""Fine-tuning: `finetune(FinetuneOptions(...))` or `smolvlm finetune ...` (LoRA through peft, or full)."""

from .options import FinetuneOptions

__all__ = ["FinetuneOptions", "FinetuneResult", "finetune"]

_LAZY = {"finetune": "smolvlm.training.run", "FinetuneResult": "smolvlm.training.run"}  # torch is heavy


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smolvlm.training' has no attribute {name!r}")
