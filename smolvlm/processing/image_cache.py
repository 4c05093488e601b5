"""Processed images by content: a picture sent again (each turn of a chat resends the conversation, a server sees one
picture from many users) gets its frames without resizing, tiling and normalising it again, and its frames' content
keys (what the engine's image-feature and prefix caches key on) without hashing its tiles again.

An image's key is SHA-256 of its decoded RGB pixels (size included: bytes alone don't fix the shape) and the image
processor's settings: the content, never a path or URL, so a file that changed misses and the same picture from
another URL hits. Hashing a 1536x1024 photo's 4.7 MB of pixels takes a few ms, against ~55 ms to resize, tile and
normalise it into 13 frames and ~130 ms to hash those frames' 68 MB (pixels and masks). Frame i's key hashes the
image's key and i. An entry holds the float32 frames [n, 3, M, M] (41 MB for 13 tiles of 512), which callers share
and must not write; the masks are all ones for real frames, so they are not kept.

`cache` is any object with `get(key) -> ProcessedImage | None` and `put(key, ProcessedImage)` (generation/caches.py
gives an LRU under a byte budget).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from PIL import Image

from .image_processor import ImageBatch, ImageProcessor


@dataclass(frozen=True)
class ProcessedImage:
    frames: torch.Tensor  # float32 [n, 3, M, M], shared: read only
    rows: int  # tile rows (0: not split)
    cols: int
    keys: tuple[bytes, ...]  # one content key per frame

    @property
    def nbytes(self) -> int:
        return self.frames.nbytes


def image_key(image: Image.Image, processor: ImageProcessor) -> bytes:
    """16 bytes naming an RGB image's pixels and what `processor` makes of them (its settings' repr)."""
    h = hashlib.sha256(f"{image.size}{image.mode}{processor!r}".encode())
    h.update(image.tobytes())
    return h.digest()[:16]


def process(processor: ImageProcessor, image: Image.Image, cache) -> ProcessedImage:
    """One image's frames and their keys, from `cache` or computed (and kept there)."""
    key = image_key(image, processor)
    entry = cache.get(key)
    if entry is None:
        frames, rows, cols = processor.frames(image)
        keys = tuple(hashlib.sha256(key + i.to_bytes(4, "little")).digest()[:16] for i in range(frames.shape[0]))
        entry = ProcessedImage(frames, rows, cols, keys)
        cache.put(key, entry)
    return entry


def process_batch(processor: ImageProcessor, images: list[list[Image.Image]], cache) -> tuple[ImageBatch, list]:
    """`processor(images)` (equal tensors) through `cache`, and each sample's frame keys (a list per sample). One
    sample with one image (a chat's) returns the cached frames themselves and an expanded mask: no copy, read only."""
    entries = [[process(processor, image, cache) for image in sample] for sample in images]
    counts = [sum(e.frames.shape[0] for e in sample) for sample in entries]
    m = processor.max_image_size
    if len(entries) == 1 and len(entries[0]) == 1:  # the cached frames [1, n, 3, M, M]; a mask of ones, unallocated
        pixel_values = entries[0][0].frames[None]
        mask = torch.ones((), dtype=torch.int64).expand(1, counts[0], m, m)
    else:  # zero frames pad the samples with fewer frames, as the image processor's
        pixel_values = torch.zeros((len(entries), max(counts), 3, m, m), dtype=torch.float32)
        mask = torch.zeros((len(entries), max(counts), m, m), dtype=torch.int64)
        for b, sample in enumerate(entries):
            if sample:
                torch.cat([e.frames for e in sample], out=pixel_values[b, : counts[b]])
                mask[b, : counts[b]] = 1
    rows, cols = [[e.rows for e in s] for s in entries], [[e.cols for e in s] for s in entries]
    batch = ImageBatch(pixel_values, mask, rows, cols)
    return batch, [[k for e in sample for k in e.keys] for sample in entries]
