"""Image-feature cache: connector outputs of image frames, keyed by a hash of the frame's pixels, LRU under a byte
budget.

The key is the content the model sees (a frame's `pixel_values` tile and its pixel mask, shape and dtype included),
never a path or URL: a file that changed gives another key. The same picture in a later turn, a later request or
another row of the same batch is encoded once. Entries are [image_seq_len, D_t] tensors in the model's dtype
(64 x 576 bf16 = 74 KB for SmolVLM2-256M), so even a small budget holds hundreds of frames.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch


def frame_keys(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> list[bytes]:
    """One 16-byte content hash per frame of `pixel_values` [I, 3, H, W] with its mask [I, H, W]."""
    pixels, masks = pixel_values.contiguous().cpu().numpy(), pixel_attention_mask.contiguous().cpu().numpy()
    keys = []
    for frame, mask in zip(pixels, masks):  # reads the bytes in place; SHA-256 has CPU instructions (~1 GB/s)
        h = hashlib.sha256(f"{frame.shape}{frame.dtype}{mask.dtype}".encode())
        h.update(frame)
        h.update(mask)
        keys.append(h.digest()[:16])
    return keys


class LRU:
    """Tensors by key under a byte budget; the least recently used go first. Thread-safe; counts hits and misses."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> torch.Tensor | None:
        with self.lock:
            value = self.entries.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self.entries.move_to_end(key)
            return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        """Keep `value` (a tensor the caller no longer writes) unless it alone exceeds the budget."""
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return
            self.entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
                self.evictions += 1

    def touch(self, keys) -> None:
        """Mark `keys` (those present) as just used, in order: the last one is the most recent."""
        with self.lock:
            for key in keys:
                if key in self.entries:
                    self.entries.move_to_end(key)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.bytes = 0

    def snapshot(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}
