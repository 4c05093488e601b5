"""The caches one model's engines share: image features (feature_cache.py) and KV prefix blocks (prefix_cache.py).

`Caches(cache_mb)` splits one memory budget: 1/8 for image features (a frame's features are small), the rest for KV
blocks. A `Caches` belongs to one model (keys are content hashes, not model names); `smolvlm.load` makes one per
`SmolVLM`, and every engine it builds (the API's, the server's) uses it, so a later call or request finds the work of
an earlier one.
"""

from __future__ import annotations

from ..defaults import DEFAULT_CACHE_MB
from .feature_cache import LRU
from .prefix_cache import PrefixCache

MiB = 1 << 20


class Caches:
    def __init__(self, cache_mb: float = DEFAULT_CACHE_MB):
        budget = int(cache_mb * MiB)
        self.features = LRU(budget // 8)
        self.prefix = PrefixCache(budget - budget // 8)

    def clear(self) -> None:
        self.features.clear()
        self.prefix.blocks.clear()

    def snapshot(self) -> dict:
        """Hit counters and sizes, for logs and the server's /health."""
        return {"image_features": self.features.snapshot(), "prefix": self.prefix.snapshot()}
