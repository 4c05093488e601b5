"""Generation: the engine (continuous batching over KV-cache slots), the sampler and the incremental detokenizer."""

from .caches import Caches
from .engine import Engine, GenerationResult, StepOutput
from .prompt import Prompt, end_token_ids, prepare, prepare_all
from .sampling import SamplingParams

__all__ = [
    "Caches", "Engine", "GenerationResult", "Prompt", "SamplingParams", "StepOutput", "end_token_ids", "prepare",
    "prepare_all",
]
