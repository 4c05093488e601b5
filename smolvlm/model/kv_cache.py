"""Preallocated key/value cache for the text decoder: one row per sequence slot, never grown."""

from __future__ import annotations

import math
import mmap

import torch


class KVCache:
    """`k`, `v`: [n_layers, max_batch, n_kv_heads, max_len, head_dim], allocated once.

    Rows are slots (a generation engine maps requests to rows); each new key/value goes to the position its
    `positions` entry names, so rows can be at different lengths and a slot can be reused by overwriting it.
    """

    def __init__(self, n_layers, max_batch, n_kv_heads, max_len, head_dim, dtype=torch.float32, device=None):
        shape = (n_layers, max_batch, n_kv_heads, max_len, head_dim)
        self.k, self.v = lazy_zeros(shape, dtype, device), lazy_zeros(shape, dtype, device)

    def rows(self, start: int) -> KVCache:
        """The cache seen from row `start` on, sharing this one's storage (`write` fills rows 0..B-1 of a cache, so
        an engine prefills new requests into rows start.. through this view)."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:], self.v[:, start:]
        return view

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor):
        """Write `k_new`, `v_new` [B, H_kv, T, Dh] at `positions` [B, T] of rows 0..B-1; return those rows' k, v
        ([B, H_kv, max_len, Dh] views into the cache)."""
        b, h, t, d = k_new.shape
        k, v = self.k[layer, :b], self.v[layer, :b]
        index = positions[:, None, :, None].expand(b, h, t, d)  # scatter along the sequence dim, no host sync
        k.scatter_(2, index, k_new.to(k.dtype))
        v.scatter_(2, index, v_new.to(v.dtype))
        return k, v


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros that take memory only where written. On the CPU they come from an anonymous mapping, whose pages are
    the kernel's shared zero page until first written, so a cache sized for a server's 8 x 8192 tokens (1.5 GB in
    fp32 at the 256M shape; `torch.zeros` writes, and so holds, all of it) costs the resident memory of the tokens
    its rows have held. Elsewhere `torch.zeros`."""
    if torch.device(device or "cpu").type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    pages = mmap.mmap(-1, max(1, count * dtype.itemsize), flags=mmap.MAP_PRIVATE)  # kept alive by the tensor
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)

