"""smolvlm: run and fine-tune the SmolVLM family of small vision-language models."""

from .errors import CheckpointError, ConfigError, InputError, SmolVLMError

__version__ = "0.1.0"  # pyproject.toml reads it

__all__ = [
    "CheckpointError", "ConfigError", "InputError", "Model", "Processor", "SmolVLM", "SmolVLMConfig", "SmolVLMError",
    "VideoFrames", "load", "load_image", "load_video",
]

_LAZY = {  # imported on first use (torch is heavy)
    "Model": "smolvlm.model",
    "Processor": "smolvlm.processing",
    "SmolVLMConfig": "smolvlm.config",
    "SmolVLM": "smolvlm.api",
    "load": "smolvlm.api",
    "load_image": "smolvlm.processing.images",
    "load_video": "smolvlm.processing.video",
    "VideoFrames": "smolvlm.processing.video",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smolvlm' has no attribute {name!r}")
