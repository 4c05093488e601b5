"""The caches one model's engines share: image features (feature_cache.py), KV prefix blocks (prefix_cache.py) and
processed images (processing/image_cache.py: what `prepare(..., image_cache=caches.images)` reads).

`Caches(cache_mb)` splits one memory budget: 1/8 for image features (a frame's features are small), 1/4 for processed
images (a 13-tile photo's float32 frames are 41 MB: the default budget keeps one such photo, or dozens of one-tile
images), the rest for KV blocks. A `Caches` belongs to one model (keys are content hashes, not model names);
`smolvlm.load` makes one per `SmolVLM`, and every engine it builds (the API's, the server's) uses it, so a later call
or request finds the work of an earlier one.
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
        self.images = LRU(budget // 4)
        self.prefix = PrefixCache(budget - budget // 8 - budget // 4)

    @property
    def bytes(self) -> int:
        return self.features.bytes + self.images.bytes + self.prefix.blocks.bytes

    def clear(self) -> None:
        self.features.clear()
        self.images.clear()
        self.prefix.blocks.clear()

    def snapshot(self) -> dict:
        """Hit counters and sizes, for logs and the server's /health."""
        return {"image_features": self.features.snapshot(), "processed_images": self.images.snapshot(),
                "prefix": self.prefix.snapshot()}
