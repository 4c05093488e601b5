"""The SmolVLM network: SigLIP vision encoder -> pixel-shuffle connector -> SmolLM2 decoder."""

from .kv_cache import KVCache
from .text import TextModel

__all__ = ["KVCache", "TextModel"]
