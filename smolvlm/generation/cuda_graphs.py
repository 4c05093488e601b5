"""The decode step at static shapes, replayed from CUDA graphs (as nano-vllm's model runner and gpt-fast do).

On a GPU one eager decode step of the 256M model is about 1200 kernel launches, so small batches are bound by the
launches, not by the GPU. `GraphDecoder` runs `Model.decode` over fixed shapes instead, and on CUDA captures it once
per shape and replays it every step:

- Rows: the n decoding rows are padded to a batch bucket b (1, 2, 4, 8, then multiples of 16, and max_batch). The
  static token and position buffers hold [max_batch]; rows n..b-1 are padding whose position is the cache's last one,
  max_len - 1. A padded row is never a decoding row (those are rows 0..n-1), and no prompt reaches position
  max_len - 1 (the engine refuses prompts of max_len tokens), so its key/value write lands where nothing is read before
  it is written again; its logits are computed and dropped. Every op of the step is row-wise (matmuls, norms, RoPE,
  each row's own attention), so padding rows cannot change real rows.
- Keys: each graph attends a fixed S key positions, S = a power of two from 256 up (capped at max_len), under the
  mask `arange(S) <= position` made inside the graph from the position buffer; a step uses the smallest S that covers
  its longest row, so short sequences don't read the whole cache.

Graphs are captured lazily, the first time a (b, S) is needed, into one shared memory pool (they never run at the same
time, and each keeps its own output alive), after one eager warm-up run of the same step (it writes the keys/values
the replay writes again). Nothing in a replay syncs with the host: the step's inputs are copied into the static
buffers on the device. On the CPU (`capture=False`) the same padded static step runs eagerly: that is what the tests
compare with the unpadded step.
"""

from __future__ import annotations

import torch

from ..model.kv_cache import KVCache

MIN_KEYS = 256  # the smallest key bucket


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes, ascending: 1, 2, 4, 8, 16, 32, 48, ... and max_batch itself."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


def key_bucket(keys: int, max_len: int) -> int:
    """The key length a step attending `keys` positions runs at: the next power of two >= keys (at least MIN_KEYS),
    at most max_len."""
    return min(max_len, max(MIN_KEYS, 1 << (keys - 1).bit_length()))


class GraphDecoder:
    """`Model.decode(tokens, positions, cache, keys)` at padded static shapes over one KV cache; on CUDA captured in
    CUDA graphs (capture=True) and replayed. Call it as `Model.decode` (same arguments, logits [n, V])."""

    def __init__(self, model, cache: KVCache, capture: bool = True):
        self.model, self.cache, self.capture = model, cache, capture
        device = cache.k.device
        self.buckets = batch_buckets(cache.max_batch)
        self.tokens = torch.zeros(cache.max_batch, dtype=torch.long, device=device)  # [max_batch] static inputs
        self.positions = torch.zeros(cache.max_batch, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple] = {}  # (b, S) -> (CUDAGraph, its logits [b, V]); eager: (None, None)
        self.pool = None  # the graphs' shared memory pool (made by the first capture)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, keys: int) -> torch.Tensor:
        """Logits [n, V] for `tokens` [n] at `positions` [n] of cache rows 0..n-1 (what `Model.decode` returns)."""
        if cache is not self.cache:
            raise ValueError("GraphDecoder: called with another cache than the one its graphs were captured over")
        n = tokens.shape[0]
        b = next(size for size in self.buckets if size >= n)
        s = key_bucket(keys, cache.max_len)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.positions[n:b].fill_(cache.max_len - 1)  # padding rows write the cache's last position only
        if (b, s) not in self.graphs:
            self.graphs[b, s] = self._capture(b, s) if self.capture else (None, None)
        graph, logits = self.graphs[b, s]
        if graph is None:  # eager (the CPU): the same padded static step
            logits = self._step(b, s)
        else:
            graph.replay()
        return logits[:n]

    def _step(self, b: int, s: int) -> torch.Tensor:
        """The static step: rows 0..b-1 of the buffers, keys 0..s-1. Logits [b, V]."""
        return self.model.decode(self.tokens[:b], self.positions[:b], self.cache, s)

    def _capture(self, b: int, s: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy initialisations (cuBLAS handles, workspaces) happen outside
            self._step(b, s)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(b, s)
        self.pool = graph.pool()
        return graph, logits
