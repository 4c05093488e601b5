"""The generation engine: continuous batching over the rows ("slots") of one preallocated KV cache.

Layout. Active requests occupy cache rows 0..n-1, each right-aligned at its own positions 0..len-1 (no left padding),
so RoPE positions are cache positions and a row's length is all the engine needs to know about it. A decode step
attends keys 0..S-1 with mask `arange(S) <= pos[b]`, where S is the longest row rounded up (known on the host
without a sync), so short batches never attend over the whole cache.

Life of a request. `add_request` prepares the inputs (chat template, images) in the caller's thread and queues it.
`step` then (1) drops aborted requests, (2) decodes one token for every running row, (3) admits queued requests into
free slots with one batched prefill: right-padded prompts under plain causal attention, the image tiles of all of
them encoded as one batch. A request that finishes leaves at once; the last row is moved into its hole, so active
rows stay 0..n-1 and the cache view is a free slice.

Syncs. Inputs of the next step (last tokens, positions) stay on the device; the one host sync per forward is reading
the sampled tokens, which the detokenizer and the stop checks need anyway.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from ..model.kv_cache import KVCache
from .constraints import Matcher, grammars_for
from .detokenizer import Detokenizer
from .sampling import Sampler, SamplingParams

END_OF_UTTERANCE = "<end_of_utterance>"
KEY_BLOCK = 64  # decode attends a multiple of this many key positions


@dataclass
class Prompt:
    """Model inputs of one conversation: input_ids [T], and its image frames [I, 3, H, W] / [I, H, W] if any."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    pixel_attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class StepOutput:
    """What one `Engine.step` produced for one request: the new tokens and text, and how it ended (once it has)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None  # None while running; "stop" (end token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationResult:
    """A finished request. finish_reason: "stop" (an end token or a stop string), "length" (max_new_tokens or the
    cache row full) or "abort"."""

    request_id: str
    text: str
    token_ids: list[int]  # every generated token, the end token included
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Request:
    id: str
    prompt: Prompt
    params: SamplingParams
    detok: Detokenizer
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    length: int = 0  # tokens in the cache row (host copy of Engine.pos[slot])
    finish_reason: str | None = None
    matcher: Matcher | None = None  # the parser of a constrained answer (params.grammar)

    def result(self) -> GenerationResult:
        return GenerationResult(
            self.id, self.detok.text, self.output_ids, self.finish_reason, len(self.prompt), len(self.output_ids)
        )


def prepare(processor, messages, **options) -> Prompt:
    """Chat-template and tokenize one conversation, loading and splitting its images. `options` go to the processor
    (per-call settings such as fps, max_frames, do_image_splitting)."""
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **options)
    pixel_values = inputs.get("pixel_values")
    return Prompt(
        inputs["input_ids"][0],
        None if pixel_values is None else pixel_values[0],
        None if pixel_values is None else inputs["pixel_attention_mask"][0],
    )


def prepare_all(processor, conversations: list, **options) -> list[Prompt]:
    """`prepare` for each conversation; Prompts pass through. One at a time: preparing in threads (Pillow releases
    the GIL) took 8 one-tile conversations from 0.76 to 0.41 s on 2 cores, but the threads' malloc arenas kept
    45-85 MB more at the peak of a batch, level with the reference's peak."""
    return [item if isinstance(item, Prompt) else prepare(processor, item, **options) for item in conversations]


def end_token_ids(folder: str | Path, tokenizer) -> list[int]:
    """The ids that end an answer: generation_config.json's eos_token_id (int or list) plus <end_of_utterance>."""
    ids = [tokenizer.token_to_id(END_OF_UTTERANCE)]
    path = Path(folder) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{path}: not a valid JSON object ({e})") from e
        eos = eos if isinstance(eos, list) else [eos]
        if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in eos):
            raise ConfigError(f"{path}: field 'eos_token_id' = {eos!r}: expected an integer or a list of integers")
        ids += eos
    return sorted({i for i in ids if i is not None})


class Engine:
    def __init__(self, model, processor, end_ids: list[int], max_batch: int = 8, max_len: int = 4096):
        self.model, self.processor = model, processor
        self.end_ids = frozenset(end_ids)
        param = next(model.parameters())
        self.device = param.device
        text = model.config.text_config
        self.max_len = min(max_len, text.max_position_embeddings)
        # On the CPU the cache is fp32 whatever the model's dtype: attention runs in the cache's dtype, and torch's
        # fp32 CPU attention is several times faster than its bf16 one (the keys and values stay bf16-rounded).
        cache_dtype = torch.float32 if self.device.type == "cpu" else param.dtype
        self.cache = KVCache(
            text.num_hidden_layers, max_batch, text.num_key_value_heads, self.max_len, text.head_dim,
            dtype=cache_dtype, device=self.device,
        )  # fmt: skip
        self.sampler = Sampler(max_batch, text.vocab_size, self.device)
        long = dict(dtype=torch.long, device=self.device)
        self.pos = torch.zeros(max_batch, **long)  # tokens in each row = position of its next input token
        self.last = torch.zeros(max_batch, **long)  # each row's last sampled token = its next input token
        self.running: list[Request] = []  # running[i] owns slot i
        self.waiting: deque[Request] = deque()
        self.aborted: set[str] = set()
        self.lock = threading.Lock()  # guards waiting/aborted: a server thread adds while another one steps
        self.ids = itertools.count()

    @property
    def max_batch(self) -> int:
        return self.cache.max_batch

    # ---- hand-off (any thread) ----

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue a conversation (messages, or a `Prompt`); return its id. Raises InputError for unusable input."""
        request = self._request(prompt, params, request_id)
        self._queue([request])
        return request.id

    def abort(self, request_id: str) -> None:
        """Drop a request at the next step (it gets no further output). Unknown ids are ignored."""
        with self.lock:
            self.aborted.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- the loop (one thread) ----

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Advance every running request by one token, then admit queued ones into free slots (their first token).
        Returns what each request produced; a request appears with finish_reason set once, then never again."""
        with self.lock:
            aborted, self.aborted = self.aborted, set()
            dropped = [r for r in itertools.chain(self.waiting, self.running) if r.id in aborted]
            if dropped:
                self.waiting = deque(r for r in self.waiting if r.id not in aborted)
        for r in dropped:
            r.finish_reason = "abort"
        self._leave([r for r in dropped if r.slot >= 0])
        outputs = self._decode() if self.running else []
        with self.lock:
            new = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.running)))]
        return outputs + (self._prefill(new) if new else [])

    def generate(self, batch: list, params: SamplingParams | list | None = None) -> list[GenerationResult]:
        """Run conversations (or Prompts) to the end as one batch, with one SamplingParams or one per conversation;
        results in the order given.
        Meant for offline use: outputs of requests added by others meanwhile are dropped."""
        params = params if isinstance(params, list) else [params] * len(batch)
        if len(params) != len(batch):
            raise InputError(f"Got {len(params)} sampling parameters for {len(batch)} conversations")
        prompts = prepare_all(self.processor, batch)
        requests = [self._request(item, p) for item, p in zip(prompts, params)]  # all checked before any is queued
        self._queue(requests)
        while any(r.finish_reason is None for r in requests):
            self.step()
        return [r.result() for r in requests]

    # ---- internals ----

    def _request(self, prompt, params: SamplingParams | None, request_id: str | None = None) -> Request:
        """A request for `prompt` (messages or a Prompt), checked; not queued yet."""
        params = params or SamplingParams()
        if not isinstance(prompt, Prompt):
            prompt = prepare(self.processor, prompt)
        if len(prompt) >= self.max_len:
            raise InputError(f"The prompt has {len(prompt)} tokens; this engine holds at most {self.max_len - 1}")
        config = self.model.config
        side = config.vision_config.image_size
        if prompt.pixel_values is not None and tuple(prompt.pixel_values.shape[1:]) != (3, side, side):
            raise InputError(
                f"Image frames of shape {list(prompt.pixel_values.shape[1:])}: the model takes [3, {side}, {side}] "
                "(the checkpoint's processor settings make those)"
            )
        n_frames = 0 if prompt.pixel_values is None else prompt.pixel_values.shape[0]
        n_tokens = int((prompt.input_ids == config.image_token_id).sum())
        if n_tokens != n_frames * config.image_seq_len:  # refused here, not in a step shared with other requests
            raise InputError(
                f"The prompt has {n_tokens} image tokens but {n_frames} image frames x {config.image_seq_len} tokens "
                f"= {n_frames * config.image_seq_len}; build it with the processor, and don't truncate it"
            )
        request_id = str(next(self.ids)) if request_id is None else request_id
        matcher = None if params.grammar is None else self.grammars.matcher(params.grammar)  # InputError if bad
        return Request(request_id, prompt, params, Detokenizer(self.processor.tokenizer, params.stop), matcher=matcher)

    @property
    def grammars(self):
        """Compiles grammars and masks the logits of constrained rows (made on the first constrained request)."""
        return grammars_for(self.processor.tokenizer, self.end_ids)

    def _logits(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits [n, V] of `requests` with what their grammars forbid masked out (constrained rows only)."""
        if all(r.matcher is None for r in requests):
            return logits
        return self.grammars.mask(logits, [r.matcher for r in requests])

    def _queue(self, requests: list[Request]) -> None:
        with self.lock:
            taken = {r.id for r in itertools.chain(self.waiting, self.running)}
            for r in requests:
                if r.id in taken:
                    raise InputError(f"Request id {r.id!r} is already in use")
                taken.add(r.id)
            self.waiting.extend(requests)

    def _decode(self) -> list[StepOutput]:
        n = len(self.running)
        keys = min(self.max_len, -(-(max(r.length for r in self.running) + 1) // KEY_BLOCK) * KEY_BLOCK)
        logits = self.model.decode(self.last[:n], self.pos[:n], self.cache, keys)  # [n, V]
        tokens = self.sampler(self._logits(logits, self.running))  # [n]
        self.last[:n] = tokens
        self.pos[:n] += 1
        for r in self.running:
            r.length += 1
        return self._emit(self.running, tokens)

    def _prefill(self, new: list[Request]) -> list[StepOutput]:
        start, k = len(self.running), len(new)
        lengths = [len(r.prompt) for r in new]
        ids = torch.full((k, max(lengths)), self.processor.pad_token_id, dtype=torch.long)
        for i, r in enumerate(new):  # right padding: every prompt at positions 0..len-1
            ids[i, : lengths[i]] = r.prompt.input_ids
        ids = ids.to(self.device)
        embeds = self.model.embed(ids, self._image_features(new))  # [k, T, D]
        t = ids.shape[1]
        positions = torch.arange(t, device=self.device).expand(k, t)
        # causal over cache positions (no mask): with the C++ kernels each row attends only its own keys, so its
        # padding and the other prompts change nothing (batch invariance)
        hidden = self.model.model.text_model(embeds, positions, cache=self.cache.rows(start), cache_positions=positions)
        last = torch.tensor(lengths, device=self.device) - 1
        hidden = hidden[torch.arange(k, device=self.device), last]  # [k, D]: each prompt's last real token
        for i, r in enumerate(new):
            r.slot, r.length = start + i, lengths[i]
            self.sampler.set(r.slot, r.params, r.prompt.input_ids)
        tokens = self.sampler(self._logits(self.model.lm_head(hidden), new), start=start)
        self.last[start : start + k] = tokens
        self.pos[start : start + k] = last + 1
        self.running += new
        return self._emit(new, tokens)

    def _image_features(self, requests: list[Request]) -> torch.Tensor | None:
        """Features of the image frames of `requests`, all tiles encoded as one batch: [n_frames * N, D]."""
        frames = [r.prompt for r in requests if r.prompt.pixel_values is not None]
        if not frames:
            return None
        pixels = torch.cat([p.pixel_values for p in frames])[None].to(self.device)  # [1, I, 3, S, S]
        masks = torch.cat([p.pixel_attention_mask for p in frames])[None].to(self.device)  # [1, I, S, S]
        return self.model.get_image_features(pixels, masks)

    def _emit(self, requests: list[Request], tokens: torch.Tensor) -> list[StepOutput]:
        """Book the sampled tokens (the step's one host sync), detokenize, check the stop conditions."""
        outputs = []
        for r, token in zip(requests, tokens.tolist()):
            r.output_ids.append(token)
            text = "" if token in self.end_ids else r.detok.add(token)
            if token in self.end_ids or r.detok.stopped or (r.matcher is not None and r.matcher.advance(token)):
                r.finish_reason = "stop"  # an end token, a stop string, or the grammar is complete
            elif len(r.output_ids) >= r.params.max_new_tokens or r.length >= self.max_len:  # no room for the token
                r.finish_reason = "length"
            if r.finish_reason:
                text += r.detok.finish()
            outputs.append(StepOutput(r.id, [token], text, r.finish_reason, len(r.prompt), len(r.output_ids)))
        self._leave([r for r in requests if r.finish_reason])
        return outputs

    def _leave(self, requests: list[Request]) -> None:
        """Free the slots of `requests`, moving the last row into each hole (highest slot first)."""
        for r in sorted(requests, key=lambda r: r.slot, reverse=True):
            last = len(self.running) - 1
            if r.slot != last:
                moved = self.running[last]
                n = moved.length
                self.cache.k[:, r.slot, :, :n] = self.cache.k[:, last, :, :n]
                self.cache.v[:, r.slot, :, :n] = self.cache.v[:, last, :, :n]
                self.pos[r.slot], self.last[r.slot] = self.pos[last], self.last[last]
                self.sampler.move(last, r.slot)
                self.running[r.slot], moved.slot = moved, r.slot
            else:
                self.sampler.free(last)
            self.running.pop()
