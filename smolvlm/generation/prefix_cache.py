"""KV prefix cache: the keys and values of earlier requests' prompts (and answers), in hashed blocks, LRU under a
byte budget.

A sequence is cut into blocks of BLOCK tokens; block i's key hashes block i-1's key, its token ids and the content
keys (feature_cache.frame_keys) of the image frames its `<image>` tokens show, so a key names the whole prefix up to
the block's end, images included: all `<image>` ids look alike, their pictures don't. A block holds the K and V of
its tokens in every layer, [2, n_layers, n_kv_heads, BLOCK, head_dim] in the model's dtype (a bf16 model's keys and
values are bf16 numbers even in the CPU's fp32 cache, so bf16 blocks are exact at half the bytes), copied out of a
cache row when a request's prefill ends (its prompt) and when it leaves (prompt + answer), and copied back into the
row of a new request whose sequence starts with the same blocks. On a CPU the copy is a memcpy (a 900-token prefix of
SmolVLM2-256M, ~40 MB in fp32, takes a few ms) against the seconds its prefill costs, so the slot layout the C++
decode step reads stays as it is (no paged attention).

Copies make eviction and concurrency simple: a request owns its row and never points into the store, so evicting a
block never touches a running request. Lookups refresh a prefix from its deepest block to its first, so the first
blocks of a prefix are the last to go (a prefix loses its tail first, never its head).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch

from ..model.kv_cache import KVCache
from .feature_cache import LRU

BLOCK = 32  # tokens per block: hashing and copying cost per block, and a prefix is reused to a block boundary


def extend_keys(keys: list[bytes], ids: torch.Tensor, frame_of: torch.Tensor | None, frames: list[bytes] | None,
                n_tokens: int) -> list[bytes]:
    """Append to `keys` the keys of the full blocks of `ids` [T] up to `n_tokens` tokens; returns `keys`.
    frame_of [T_prompt]: the frame index each prompt token shows (-1: text), `frames` the frames' content keys."""
    data = ids.numpy()
    for i in range(len(keys), n_tokens // BLOCK):
        a, b = i * BLOCK, (i + 1) * BLOCK
        h = hashlib.sha256(keys[-1] if keys else b"")
        h.update(data[a:b].tobytes())
        if frame_of is not None:
            shown = frame_of[a:b]
            for f in torch.unique_consecutive(shown[shown >= 0]).tolist():
                h.update(frames[f])
        keys.append(h.digest()[:16])
    return keys


@contextmanager
def one_thread():
    """Run the block copies on one thread. They are memory-bound copies of 8 KB runs (one per layer and head), which a
    second thread doesn't speed up, and with the cores shared OpenMP's barriers made a 40 MB prefix take 1-2 s to copy
    on 2 threads against 20-40 ms on one (docs/architecture.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.blocks = LRU(max_bytes)
        self.queried = self.reused = 0  # prompt tokens looked up / found (tokens, not blocks)

    def load(self, keys: list[bytes], cache: KVCache, row: int, limit: int) -> int:
        """Copy the longest stored prefix of the blocks `keys` (at most `limit` tokens) into positions 0.. of `row`
        of `cache`; returns its length in tokens."""
        with self.blocks.lock:
            found = []
            for key in keys[: limit // BLOCK]:
                block = self.blocks.entries.get(key)
                if block is None:
                    break
                found.append(block)
            for key in reversed(keys[: len(found)]):
                self.blocks.entries.move_to_end(key)
        with one_thread():
            for i, block in enumerate(found):  # [2, L, H_kv, BLOCK, Dh]
                cache.k[:, row, :, i * BLOCK : (i + 1) * BLOCK] = block[0]
                cache.v[:, row, :, i * BLOCK : (i + 1) * BLOCK] = block[1]
        n = len(found) * BLOCK
        self.queried += limit
        self.reused += n
        return n

    def store(self, keys: list[bytes], cache: KVCache, row: int, dtype: torch.dtype) -> None:
        """Keep the blocks `keys` (positions 0..len(keys) * BLOCK of `row`) that are not stored yet, in `dtype` (one
        that holds the cache's values exactly)."""
        with one_thread():
            for i, key in enumerate(keys):
                if key not in self.blocks.entries:
                    a, b = i * BLOCK, (i + 1) * BLOCK
                    self.blocks.put(key, torch.stack([cache.k[:, row, :, a:b], cache.v[:, row, :, a:b]]).to(dtype))
        self.blocks.touch(reversed(keys))

    def snapshot(self) -> dict:
        return {**self.blocks.snapshot(), "block_tokens": BLOCK, "queried_tokens": self.queried,
                "reused_tokens": self.reused}
