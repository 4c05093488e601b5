"""smolvlm: run and fine-tune the SmolVLM family of small vision-language models."""

from .errors import CheckpointError, ConfigError, InputError, SmolVLMError

__all__ = [
    "CheckpointError", "ConfigError", "InputError", "Model", "Processor", "SmolVLM", "SmolVLMConfig", "SmolVLMError",
    "load",
]

_LAZY = {  # imported on first use (torch is heavy)
    "Model": "smolvlm.model",
    "Processor": "smolvlm.processing",
    "SmolVLMConfig": "smolvlm.config",
    "SmolVLM": "smolvlm.api",
    "load": "smolvlm.api",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smolvlm' has no attribute {name!r}")
