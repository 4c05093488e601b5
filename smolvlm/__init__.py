"""smolvlm: run and fine-tune the SmolVLM family of small vision-language models."""

from .errors import CheckpointError, ConfigError, InputError, SmolVLMError

__all__ = ["CheckpointError", "ConfigError", "InputError", "SmolVLMError"]
