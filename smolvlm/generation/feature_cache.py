"""Image-feature cache: connector outputs of image frames, keyed by a hash of the frame's pixels, LRU under a byte
budget; and the gathering of the features a prefill chunk needs.

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

from ..errors import InputError
from ..model.vlm import vision_chunk

ZERO_FRAME = "An image frame is all zeros (what batch padding looks like): the model drops it"


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
    """Values (tensors, or anything with `nbytes`) by key under a byte budget; the least recently used go first.
    Thread-safe. Counts hits (`get` found the key) and misses (a value was computed and `put`: several lookups of one
    missing key that a single computation serves count once)."""

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
            if value is not None:
                self.hits += 1
                self.entries.move_to_end(key)
            return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        """Keep `value` (a tensor the caller no longer writes) unless it alone exceeds the budget."""
        size = value.nbytes
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return
            self.misses += 1
            if size > self.max_bytes:
                return
            self.entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.nbytes
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


def ready(r, frame: int, cache: LRU | None) -> bool:
    """Whether frame `frame` of request `r` needs no vision pass (encoded already, or in the cache)."""
    return r.features[frame] is not None or (cache is not None and r.frames[frame] in cache.entries)


def stacked_frames(model, shown: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels [1, g, 3, S, S] and pixel masks [1, g, S, S] of (request, frame) pairs, on the model's device: one
    image of g frames, as Model.image_frames and get_image_features take them."""
    pixels = torch.stack([r.prompt.pixel_values[f] for r, f in shown])[None].to(model.device)
    masks = torch.stack([r.prompt.pixel_attention_mask[f] for r, f in shown])[None].to(model.device)
    return pixels, masks


def chunk_features(model, cache: LRU | None, chunks: list) -> torch.Tensor | None:
    """Features [n, D] of the image tokens of `chunks` ((request, end): prompt positions request.length..end-1), in
    order. Each frame shown comes from its request (encoded by an earlier chunk), the cache, or one vision batch of
    the distinct frames still missing (the same picture in several rows is encoded once)."""
    missing: dict = {}  # frame key -> [(request, frame)] that show it
    for r, end in chunks:
        for f in r.shows(r.length, end):
            if r.features[f] is not None:
                continue
            key = (id(r), f) if r.frames is None else r.frames[f]  # caches off: no key, no sharing
            r.features[f] = None if r.frames is None else cache.get(key)
            if r.features[f] is None:
                missing.setdefault(key, []).append((r, f))
    n = model.config.image_seq_len
    if missing:
        shown = [users[0] for users in missing.values()]
        # Stacked a vision pass's worth at a time: an unchunked prefill of many tiled photos (a batch job's) would
        # otherwise hold a second copy of all their pixels (16 photos of ~14 tiles: ~1 GB in fp32).
        group = vision_chunk(model.device)
        encoded = []
        for i in range(0, len(shown), group):
            part = shown[i : i + group]
            encoded.append(model.get_image_features(*stacked_frames(model, part)))  # [g * N, D]
            if encoded[-1].shape[0] != len(part) * n:
                raise InputError(ZERO_FRAME)
        encoded = torch.cat(encoded)  # [m * N, D]
        for (key, users), features in zip(missing.items(), encoded.view(len(shown), n, -1).unbind(0)):
            if isinstance(key, bytes):
                cache.put(key, features.clone())  # its own storage: evicted alone
            for r, f in users:
                r.features[f] = features
    parts = []
    for r, end in chunks:
        if r.frame_of is None:
            continue
        a, b = int(r.images_before[r.length]), int(r.images_before[end])
        if b > a:  # image tokens a..b-1 of the prompt: frames a // n .. (b - 1) // n
            first = a // n
            parts.append(torch.cat(r.features[first : (b - 1) // n + 1])[a - first * n : b - first * n])
    return torch.cat(parts) if parts else None
