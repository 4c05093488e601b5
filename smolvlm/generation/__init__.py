"""Generation: the engine (continuous batching over KV-cache slots), the sampler and the incremental detokenizer."""

from .sampling import SamplingParams

__all__ = ["SamplingParams"]
