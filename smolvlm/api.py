"""The Python API: `vlm = smolvlm.load(...)`, then `vlm.generate(messages)`, `vlm.complete(...)`, `vlm.stream(...)`.

Messages are chat turns as the processor reads them: `[{"role": "user", "content": [{"type": "image", "image": ...},
{"type": "text", "text": "..."}]}]` (HF or OpenAI content blocks; images by path, URL, bytes, base64 or PIL), or
plain string content. A bare string is one user message. A list of conversations is generated as one batch.

Structured output: `json_schema=` (a dict, or a pydantic model class: `generate` then returns a validated instance),
`regex=` or `choices=` constrain the answer (smolvlm/generation/constraints.py).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing

import torch
from tqdm.auto import tqdm

from . import hub
from .adapters import adapter_base, is_adapter, merge_adapter
from .hub import DEFAULT_MODEL
from .errors import InputError, SmolVLMError
from .generation import (Caches, Engine, GenerationResult, Prompt, SamplingParams, StepOutput, end_token_ids,
                         prepare, prepare_all)
from .generation.caches import DEFAULT_CACHE_MB
from .generation.constraints import Grammar
from .model import Model
from .processing import Processor

MAX_BATCH = 16  # conversations decoded together; more wait in the engine's queue for a free slot
PREPARE_AHEAD = 8  # conversations of a list prepared (images decoded and split) but not yet in a batch slot
LEN_BLOCK = 256  # the KV cache length is rounded up to a multiple of this
# Per-call settings that go to the processor rather than the sampler: video frame sampling, and image splitting
# (off: one tile per image, far faster on a CPU, at some cost in detail) with the resize before it (size).
PROCESSOR_OPTIONS = ("fps", "max_frames", "do_image_splitting", "size")


def load(
    path_or_repo_id: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    progress: bool = True,
    quantize: str | None = None,
    adapter: str | os.PathLike | None = None,
    cache_mb: float = DEFAULT_CACHE_MB,
) -> SmolVLM:
    """Load a checkpoint folder or hub repo id. dtype defaults to the checkpoint's own; device to CUDA if available,
    else the CPU. quantize="int8": int8 text-decoder weights (CPU). Progress bars (downloads, loading) go to stderr.
    The model is fused for inference (`Model.fuse`); `vlm.model.unfuse()` gives back the HF module tree.
    `adapter`: a LoRA adapter folder merged into the weights (smolvlm/adapters.py); a LoRA adapter folder given as
    `path_or_repo_id` is loaded onto the base model its adapter_config.json names.
    cache_mb: memory for the caches every call shares (image features and prompt keys/values of earlier calls,
    smolvlm/generation/caches.py); 0 turns them off."""
    if adapter is None and is_adapter(path_or_repo_id):
        adapter, path_or_repo_id = path_or_repo_id, adapter_base(path_or_repo_id)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # disable=None: shown on a terminal only, so logs and pipes get no bar fragments
    disable = None if progress else True
    bar = tqdm(total=3, desc=f"Loading {path_or_repo_id}", file=sys.stderr, disable=disable, leave=False)
    with bar:
        folder = hub.resolve(path_or_repo_id, revision=revision)
        bar.update()
        processor = Processor.from_pretrained(folder)
        bar.update()
        if adapter is None:
            model = Model.from_pretrained(folder, dtype=dtype, device=device, fuse=True, quantize=quantize)
        else:  # peft wraps the HF module tree: merge first, fuse after
            model = Model.from_pretrained(folder, dtype=dtype, device=device)
            model = merge_adapter(model, adapter).fuse(quantize)
        bar.update()
    return SmolVLM(model, processor, end_token_ids(folder, processor.tokenizer), cache_mb)


class SmolVLM:
    """A loaded model with its processor. `generate` returns answers, `complete` the full results, `stream` pieces.
    Calls may interleave (a stream left open while `generate` runs keeps its pieces), but not from several threads:
    a server drives an `Engine` from one loop thread instead. `caches` (None with cache_mb=0) keep image features
    and prompt keys/values across calls: a chat's later turns, or questions about the same image, skip that work."""

    def __init__(self, model, processor, end_ids: list[int], cache_mb: float = DEFAULT_CACHE_MB):
        if not (isinstance(cache_mb, (int, float)) and not isinstance(cache_mb, bool) and cache_mb >= 0):
            raise InputError(f"cache_mb={cache_mb!r}: expected a number of MiB >= 0 (0 turns the caches off)")
        self.model, self.processor, self.end_ids = model, processor, end_ids
        self.caches = Caches(cache_mb) if cache_mb else None
        self.engine: Engine | None = None  # made on first use, remade larger when a call needs more room
        self.unread: dict[str, list[StepOutput]] = {}  # outputs of this object's open requests, not yet read

    def generate(self, messages, **params):
        """The answer text (greedy unless temperature > 0), or a list of them for a list of conversations.
        Parameters: max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop; for the
        processor: fps and max_frames (video frame sampling), do_image_splitting, size ({"longest_edge": N}); one
        constraint: json_schema (dict or pydantic model class), regex (the whole answer matches it) or choices (the
        answer is one of them).
        With a pydantic model class as json_schema, the answer is returned as a validated instance of it."""
        schema = params.get("json_schema")
        results = self.complete(messages, **params)
        answers = [_parsed(r, schema) for r in (results if isinstance(results, list) else [results])]
        return answers if isinstance(results, list) else answers[0]

    def complete(self, messages, **params) -> GenerationResult | list[GenerationResult]:
        """Like `generate`, with each answer's finish_reason ("stop"/"length"), token ids and token counts."""
        batch, single = _as_batch(messages)
        started, fill = self._start(batch, params)
        results = []
        for i in range(len(batch)):  # all run together; reading one steps the others too
            fill(i)
            engine, request_id = started[i]
            outputs = list(self._outputs(engine, request_id, fill))
            last = outputs[-1]
            results.append(GenerationResult(
                request_id, "".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids],
                last.finish_reason, last.prompt_tokens, last.completion_tokens, last.cached_tokens,
            ))  # fmt: skip
        return results[0] if single else results

    def stream(self, messages, **params) -> Iterator[str]:
        """The answer to one conversation as text pieces (never a split character); they join to `generate`'s."""
        with closing(self.steps(messages, **params)) as steps:  # stopping early aborts the request
            for out in steps:
                if out.text:
                    yield out.text

    def steps(self, messages, **params) -> Iterator[StepOutput]:
        """`stream`'s engine outputs: each step's text and token ids; the last one has the finish_reason and
        token counts (what `smolvlm generate --json` reports, with timings)."""
        batch, single = _as_batch(messages)
        if not single:
            raise InputError("stream() takes one conversation; use generate() for a list of them")
        ((engine, request_id),), fill = self._start(batch, params)
        try:
            yield from self._outputs(engine, request_id, fill)
        finally:
            if self.unread.pop(request_id, None) is not None:  # the caller stopped reading: free the slot
                engine.abort(request_id)

    def _start(self, batch: list, params: dict) -> tuple[list[tuple[Engine, str]], Callable[[int], None]]:
        """Queue the conversations, preparing them (images decoded and split) at most PREPARE_AHEAD ahead of the
        engine: the prepared pixels of a long list never pile up. Returns (engine, request id) per conversation,
        filled in as they are queued, and the function that queues more (call it before each engine step). The
        first PREPARE_AHEAD conversations are all checked before any is queued."""
        options = {k: params.pop(k) for k in PROCESSOR_OPTIONS if k in params}
        options = {k: v for k, v in options.items() if v is not None}  # None: the checkpoint's setting
        if self.caches is not None:  # a picture sent again (a chat's later turns) is neither tiled nor hashed again
            options["image_cache"] = self.caches.images
        grammar = _grammar(params)  # pops json_schema / regex / choices
        sampling = SamplingParams(**params, grammar=grammar)
        started: list[tuple[Engine, str]] = []

        def queue(prompts: list[Prompt], engine: Engine | None) -> None:
            for prompt in prompts:
                need = len(prompt) + sampling.max_new_tokens
                if engine is None or engine.max_len < min(need, self.model.config.text_config.max_position_embeddings):
                    engine = self._engine(min(len(batch) - len(started), MAX_BATCH), need)
                started.append((engine, engine.add_request(prompt, sampling, request_id=uuid.uuid4().hex)))
                self.unread[started[-1][1]] = []

        def fill(through: int = 0) -> None:
            """Queue conversations while fewer than PREPARE_AHEAD wait for a slot, and at least up to `through`."""
            engine = started[-1][0]
            while len(started) < len(batch) and (len(started) <= through or len(engine.waiting) < PREPARE_AHEAD):
                try:
                    queue([prepare(self.processor, batch[len(started)], **options)], engine)
                except SmolVLMError:
                    self._abort(started)
                    raise
                engine = started[-1][0]

        first = prepare_all(self.processor, batch[:PREPARE_AHEAD], **options)
        try:
            queue(first[:1], self._engine(min(len(batch), MAX_BATCH),
                                          max(len(p) for p in first) + sampling.max_new_tokens))
            queue(first[1:], started[0][0])
        except SmolVLMError:
            self._abort(started)
            raise
        return started, fill

    def _abort(self, started: list[tuple[Engine, str]]) -> None:
        """Drop these requests (queued by a call that then failed) and let their engines forget them."""
        for engine, request_id in started:
            engine.abort(request_id)
            del self.unread[request_id]
        for engine in {id(e): e for e, _ in started}.values():
            self._step(engine)

    def _step(self, engine: Engine) -> None:
        for out in engine.step():
            if out.request_id in self.unread:
                self.unread[out.request_id].append(out)

    def _outputs(self, engine: Engine, request_id: str, fill: Callable[[int], None]) -> Iterator[StepOutput]:
        """`request_id`'s outputs until it finishes, stepping the engine (after `fill`) when none are waiting."""
        while True:
            while not self.unread[request_id]:
                fill()
                self._step(engine)
            out = self.unread[request_id].pop(0)
            if out.finished:
                del self.unread[request_id]
            yield out
            if out.finished:
                return

    def _engine(self, n: int, length: int) -> Engine:
        """An engine with room for n rows of `length` tokens (the model's context at most). The shared one grows
        when idle; a call that doesn't fit while streams are open on it gets one of its own."""
        limit = self.model.config.text_config.max_position_embeddings
        batch, length = min(n, MAX_BATCH), min(-(-length // LEN_BLOCK) * LEN_BLOCK, limit)
        engine = self.engine
        if engine is not None and engine.max_batch >= batch and engine.max_len >= length:
            return engine
        if engine is not None and engine.has_unfinished():
            return self.new_engine(max_batch=batch, max_len=length)
        if engine is not None:
            batch, length = max(batch, engine.max_batch), max(length, engine.max_len)
        self.engine = engine = None  # free the old cache before allocating the new one
        self.engine = self.new_engine(max_batch=batch, max_len=length)
        return self.engine

    def new_engine(self, **options) -> Engine:
        """An Engine over this model that shares its caches (options: max_batch, max_len, prefill_chunk)."""
        return Engine(self.model, self.processor, self.end_ids, caches=self.caches, **options)


def _grammar(params: dict) -> Grammar | None:
    """The one constraint among the json_schema / regex / choices parameters (popped from `params`), as a Grammar."""
    given = {k: v for k in ("json_schema", "regex", "choices") if (v := params.pop(k, None)) is not None}
    if len(given) > 1:
        raise InputError(f"Give one constraint, not {' and '.join(given)}")
    if not given:
        return None
    (kind, value), = given.items()
    return {"json_schema": Grammar.json_schema, "regex": Grammar.regex, "choices": Grammar.choice}[kind](value)


def _parsed(result: GenerationResult, model):
    """The answer: its text, or an instance of the pydantic model class `model` validated from it."""
    if not (isinstance(model, type) and hasattr(model, "model_validate_json")):
        return result.text
    if result.finish_reason == "length":
        raise InputError(f"The answer was cut at {result.completion_tokens} tokens (max_new_tokens) before its JSON "
                         f"was complete, so it can't be a {model.__name__}; allow more tokens: {result.text!r:.200}")
    return model.model_validate_json(result.text)


def _as_batch(messages) -> tuple[list, bool]:
    """(list of conversations, whether one conversation was given)."""
    if isinstance(messages, str):
        return [[{"role": "user", "content": messages}]], True
    if isinstance(messages, (list, tuple)) and messages:
        if all(isinstance(m, dict) for m in messages):
            return [list(messages)], True
        if all(isinstance(c, (str, list, tuple)) for c in messages):
            return [_as_batch(c)[0][0] for c in messages], False
    raise InputError(
        "messages must be a conversation (a non-empty list of {'role': ..., 'content': ...} dicts), a string, "
        f"or a list of those; got {type(messages).__name__}"
    )
