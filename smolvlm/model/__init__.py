"""The SmolVLM network: SigLIP vision encoder -> pixel-shuffle connector -> SmolLM2 decoder."""

from .kv_cache import KVCache
from .text import TextModel
from .vlm import Model

__all__ = ["KVCache", "Model", "TextModel"]
