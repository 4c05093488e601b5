"""Generation: the engine (continuous batching over KV-cache slots), the sampler and the incremental detokenizer."""

from .engine import Engine, GenerationResult, Prompt, StepOutput, end_token_ids, prepare
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "Prompt", "SamplingParams", "StepOutput", "end_token_ids", "prepare"]
