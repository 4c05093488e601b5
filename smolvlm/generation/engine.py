"""The generation engine: continuous batching over the rows ("slots") of one preallocated KV cache, with prefix and
image-feature caches and chunked prefill.

Layout. engine.py: the public Engine and the life of a request; prompt.py: a request's inputs; scheduler.py: the
waiting queue, admission and each step's prefill budget; prefix_cache.py: hashed KV blocks of earlier sequences;
feature_cache.py: image features by pixel content (caches.py holds both for all the engines of one model);
vision_steps.py: a tile's vision pass spread over steps while others decode; cuda_graphs.py: the decode step replayed
from CUDA graphs on a GPU. Requests occupy cache rows 0..n-1, each right-aligned at its own positions 0..len-1 (no
left padding), so RoPE positions are cache positions and a row's length is all the engine needs to know about it.
Rows 0..d-1 are decoding, rows d..n-1 are still being prefilled. A decode step attends keys 0..S-1 with mask
`arange(S) <= pos[b]`, where S is the longest row rounded up (known on the host without a sync), so short batches
never attend over the whole cache.

Life of a request. `add_request` prepares the inputs (chat template, images), hashes its image frames (unless
`prepare`'s image cache gave their keys) and its prompt's blocks (caches on) in the caller's thread, and queues it.
`step` then (1) drops aborted requests, (2) decodes one token for every decoding row, (3) admits queued requests into
free slots, copying the longest cached prefix of each into its row, (4) prefills: with nothing decoding, the whole
prompts at once, else chunks under the scheduler's budget (prompt tokens, and vision layers of the next frames
needed, a tile's pass carried over steps). A prefill writes prompt positions start..end-1 of each row, attending the
row's keys 0..end-1 (right-padded chunks under a mask, in runs of rows that pad little: Scheduler.padding_runs); the
frames a chunk shows are taken from the feature cache or encoded as one batch (each distinct frame once). A request
whose prompt is complete samples its first token and becomes a decoding row; its prompt blocks go to the prefix
cache. A request that finishes stores its prompt + answer blocks and leaves at once; rows are moved so decoding rows
stay 0..d-1 and prefilling ones d..n-1, and the cache views are free slices.

Syncs. Inputs of the next step (last tokens, positions) stay on the device; the one host sync per forward is reading
the sampled tokens, which the detokenizer and the stop checks need anyway. Hashing and cache copies happen at
admission and exit, never in the decode step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..model.kv_cache import KVCache
from ..model.vlm import vision_chunk
from .caches import Caches
from .constraints import grammars_for
from .cuda_graphs import GraphDecoder
from .detokenizer import Detokenizer
from .feature_cache import chunk_features, frame_keys, ready
from .prefix_cache import BLOCK, extend_keys
from .prompt import Prompt, prepare
from .sampling import Sampler, SamplingParams
from .scheduler import Request, Scheduler
from .vision_steps import SlicedVision

KEY_BLOCK = 64  # decode attends a multiple of this many key positions
PREFILL_CHUNK = 128  # prompt tokens prefilled per step while other requests decode (scheduler.py)
# Vision-encoder frame-layers run per step while other requests decode (vision_steps.py): one layer of 4 SmolVLM2-256M
# tiles, ~70 ms on 2 quiet AMX cores
VISION_LAYERS = 4


@dataclass
class StepOutput:
    """What one `Engine.step` produced for one request: the new tokens and text, and how it ended (once it has)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None  # None while running; "stop" (end token or stop string), "length" or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    error: str | None = None  # what failed this request alone (finish_reason "error"); the others went on

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationResult:
    """A finished request. finish_reason: "stop" (an end token or a stop string), "length" (max_new_tokens or the
    cache row full), "abort" or "error" (its own per-request work failed; see StepOutput.error)."""

    request_id: str
    text: str
    token_ids: list[int]  # every generated token, the end token included
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache


class Engine:
    """`caches`: the prefix and image-feature caches to use and fill (None: none). `prefill_chunk`: prompt tokens
    prefilled per step while other requests are decoding (scheduler.py; None: whole prompts at once);
    `vision_layers`: vision-encoder frame-layers run per step meanwhile (vision_steps.py)."""

    def __init__(self, model, processor, end_ids: list[int], max_batch: int = 8, max_len: int = 4096,
                 caches: Caches | None = None, prefill_chunk: int | None = PREFILL_CHUNK,
                 vision_layers: int = VISION_LAYERS):
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
        # On a GPU the decode step replays CUDA graphs of static shapes (cuda_graphs.py): launches, not math, bound it
        self.decode_step = GraphDecoder(model, self.cache) if self.device.type == "cuda" else model.decode
        long = dict(dtype=torch.long, device=self.device)
        self.pos = torch.zeros(max_batch, **long)  # tokens in each row = position of its next input token
        self.last = torch.zeros(max_batch, **long)  # each row's last sampled token = its next input token
        self.caches = caches
        self.scheduler = Scheduler(prefill_chunk, vision_layers)
        # a pass as wide as a step's layer budget (one layer per step), at most a vision batch (get_image_features)
        width = min(vision_layers, vision_chunk(self.device))
        self.vision = SlicedVision(model, None if caches is None else caches.features, width)
        self.running: list[Request] = []  # running[i] owns slot i
        self.decoding = 0  # running[:decoding] decode, running[decoding:] are being prefilled
        self.ids = itertools.count()

    @property
    def max_batch(self) -> int:
        return self.cache.max_batch

    # ---- hand-off (any thread) ----

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue a conversation (messages, or a `Prompt`); return its id. Raises InputError for unusable input."""
        request = self._request(prompt, params, request_id)
        self.scheduler.queue([request], self.running)
        return request.id

    def abort(self, request_id: str) -> None:
        """Drop a request at the next step (it gets no further output). Unknown ids are ignored."""
        self.scheduler.abort(request_id)

    @property
    def waiting(self):
        """Requests queued for a slot (the scheduler's queue)."""
        return self.scheduler.waiting

    def has_unfinished(self) -> bool:
        return bool(self.running or self.scheduler.waiting)

    # ---- the loop (one thread) ----

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Advance every decoding request by one token, admit queued ones into free slots and prefill (a chunk of)
        the prompts in them; a prompt prefilled to its end gives its first token. Returns what each request
        produced; a request appears with finish_reason set once, then never again."""
        dropped = self.scheduler.take_aborted(self.running)
        for r in dropped:
            r.finish_reason = "abort"
        self._leave([r for r in dropped if r.slot >= 0])
        outputs = self._decode() if self.decoding else []
        self._admit()
        return outputs + self._prefill()

    def generate(self, batch: list, params: SamplingParams | list | None = None) -> list[GenerationResult]:
        """Run conversations (or Prompts) to the end as one batch, with one SamplingParams or one per conversation;
        results in the order given. A bad conversation raises InputError and drops the whole batch.
        Meant for offline use: outputs of requests added by others meanwhile are dropped."""
        params = params if isinstance(params, list) else [params] * len(batch)
        if len(params) != len(batch):
            raise InputError(f"Got {len(params)} sampling parameters for {len(batch)} conversations")
        # The first max_batch are checked before any is queued; the rest are prepared as slots free up (at most
        # max_batch ahead), so their pixels never pile up.
        requests = [self._request(item, p) for item, p in zip(batch[: self.max_batch], params)]
        self.scheduler.queue(requests, self.running)
        try:
            while len(requests) < len(batch) or any(r.finish_reason is None for r in requests):
                while len(requests) < len(batch) and len(self.scheduler.waiting) < self.max_batch:
                    requests.append(self._request(batch[len(requests)], params[len(requests)]))
                    self.scheduler.queue(requests[-1:], self.running)
                self.step()
        except InputError:
            for r in requests:
                self.abort(r.id)
            self.step()  # drops them
            raise
        return [GenerationResult(r.id, r.detok.text, r.output_ids, r.finish_reason, len(r.prompt),
                                 len(r.output_ids), r.cached) for r in requests]

    # ---- internals ----

    def _request(self, prompt, params: SamplingParams | None, request_id: str | None = None) -> Request:
        """A request for `prompt` (messages or a Prompt), checked and hashed; not queued yet."""
        params = params or SamplingParams()
        if not isinstance(prompt, Prompt):
            prompt = prepare(self.processor, prompt, image_cache=None if self.caches is None else self.caches.images)
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
        is_image = prompt.input_ids == config.image_token_id
        n_tokens = int(is_image.sum())
        if n_tokens != n_frames * config.image_seq_len:  # refused here, not in a step shared with other requests
            raise InputError(
                f"The prompt has {n_tokens} image tokens but {n_frames} image frames x {config.image_seq_len} tokens "
                f"= {n_frames * config.image_seq_len}; build it with the processor, and don't truncate it"
            )
        request_id = str(next(self.ids)) if request_id is None else request_id
        matcher = None if params.grammar is None else self.grammars.matcher(params.grammar)  # InputError if bad
        r = Request(request_id, prompt, params, Detokenizer(self.processor.tokenizer, params.stop), matcher=matcher)
        if n_frames:
            before = is_image.cumsum(0)
            r.frame_of = torch.where(is_image, (before - 1) // config.image_seq_len, -1)  # [T]
            r.images_before = torch.cat([before.new_zeros(1), before])  # [T + 1]
        if self.caches is not None:
            if n_frames:  # keys from the processor's image cache (prepare), else the frames are hashed here
                given = prompt.frame_keys
                r.frames = given if given is not None and len(given) == n_frames else frame_keys(
                    prompt.pixel_values, prompt.pixel_attention_mask)
            extend_keys(r.keys, prompt.input_ids, r.frame_of, r.frames, len(prompt))
        return r

    @property
    def grammars(self):
        """Compiles grammars and masks the logits of constrained rows (made on the first constrained request)."""
        return grammars_for(self.processor.tokenizer, self.end_ids)

    def _logits(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits [n, V] of `requests` with what their grammars forbid masked out (constrained rows only)."""
        if all(r.matcher is None for r in requests):
            return logits
        return self.grammars.mask(logits, [r.matcher for r in requests])

    def _decode(self) -> list[StepOutput]:
        n, rows = self.decoding, self.running[: self.decoding]
        keys = min(self.max_len, -(-(max(r.length for r in rows) + 1) // KEY_BLOCK) * KEY_BLOCK)
        logits = self.decode_step(self.last[:n], self.pos[:n], self.cache, keys)  # [n, V]
        tokens = self.sampler(self._logits(logits, rows))  # [n]
        self.last[:n] = tokens
        self.pos[:n] += 1
        for r in rows:
            r.length += 1
        return self._emit(rows, tokens)

    def _admit(self) -> None:
        """Give free slots to queued requests, each row starting with its longest cached prefix."""
        for r in self.scheduler.admit(self.max_batch - len(self.running), self.running[self.decoding :]):
            r.slot = len(self.running)
            self.running.append(r)
            r.features = [None] * (0 if r.prompt.pixel_values is None else r.prompt.pixel_values.shape[0])
            if self.caches is not None:  # at least the last prompt token is computed: its logits give the answer
                r.length = r.cached = self.caches.prefix.load(r.keys, self.cache, r.slot, len(r.prompt) - 1)

    def _prefill(self) -> list[StepOutput]:
        """Prefill this step's chunks (rows start..start+k-1); sample the first token of those now complete."""
        start = self.decoding
        prefilling = self.running[start:]
        chunked = self.scheduler.chunked(start)
        # chunked: this step's slice of vision layers; else the pass in progress is finished, chunk_features the rest
        self.vision.run(prefilling, self.scheduler.vision_layers if chunked else None)
        if not prefilling:
            return []
        cached = self.caches.features if self.caches is not None else None
        ends = self.scheduler.plan(prefilling, chunked, lambda r, f: ready(r, f, cached))
        if not ends:
            return []
        chunks = list(zip(prefilling, ends))
        features = chunk_features(self.model, cached, chunks)  # [image tokens of the chunks, D]
        begins = [r.length for r, _ in chunks]
        last = []  # [D] hidden states of the last prompt token of each request completed now
        for run in self.scheduler.padding_runs([end - begin for begin, end in zip(begins, ends)]):
            rows = chunks[run.start : run.stop]
            images = sum(r.image_tokens(r.length, end) for r, end in rows)
            hidden = self._prefill_rows(start + run.start, rows, features[:images] if images else None)  # [k, T, D]
            features = features[images:] if images else features
            for i, (r, end) in zip(run, rows):
                if end == len(r.prompt):  # complete: its last token's hidden state gives its first answer token
                    last.append(hidden[i - run.start, end - 1 - begins[i]])
        for r, end in chunks:
            r.length = end
        done = [r for r, end in chunks if end == len(r.prompt)]  # the first ones (scheduler.plan)
        if not done:
            return []
        m = len(done)
        hidden = torch.stack(last)  # [m, D]
        for r in done:
            r.decoding, r.features = True, []
            r.prompt = Prompt(r.prompt.input_ids)  # its features are in the cache now: don't hold the pixels
            try:
                self.sampler.set(r.slot, r.params, r.prompt.input_ids)
            except Exception as e:  # fail it alone; greedy settings keep its row harmless for this step's sampling
                r.fail(e)
                self.sampler.set(r.slot, SamplingParams(), r.prompt.input_ids)
            if self.caches is not None:
                self.caches.prefix.store(r.keys, self.cache, r.slot, self.model.dtype)
        tokens = self.sampler(self._logits(self.model.lm_head(hidden), done), start=start)
        self.last[start : start + m] = tokens
        self.pos[start : start + m] = torch.tensor([r.length for r in done], device=self.device)
        self.decoding += m
        return self._emit(done, tokens)

    def _prefill_rows(self, row: int, chunks: list, features: torch.Tensor | None) -> torch.Tensor:
        """Run chunks ((request, end): prompt positions request.length..end-1, right-padded to the longest) through
        the text model into cache rows row.. (`features`: their image tokens') -> hidden states [k, T, D]."""
        k, begins = len(chunks), [r.length for r, _ in chunks]
        t = max(end - begin for begin, (_, end) in zip(begins, chunks))
        ids = torch.full((k, t), self.processor.pad_token_id, dtype=torch.long)
        for i, (r, end) in enumerate(chunks):  # right padding: the chunk at positions begin..end-1
            ids[i, : end - begins[i]] = r.prompt.input_ids[begins[i] : end]
        ids = ids.to(self.device)
        embeds = self.model.embed(ids, features)  # [k, T, D]
        steps = torch.arange(t, device=self.device)
        # [k, T]: padding goes on past the row's end, kept inside the cache (its keys are never attended)
        positions = (torch.tensor(begins, device=self.device)[:, None] + steps).clamp(max=self.max_len - 1)
        text = self.model.model.text_model
        if text.use_kernels and self.cache.k.dtype == torch.float32:
            # causal over cache positions (no mask): the C++ kernels attend each row's own keys 0..position only, so
            # its padding and the other rows change nothing (batch invariance)
            mask = None
        else:  # torch's attention reads keys 0..max(ends)-1 under this mask
            same = len(set(begins)) == 1  # then one mask serves every row
            keys = torch.arange(max(end for _, end in chunks), device=self.device)
            mask = keys <= (positions[:1] if same else positions)[:, None, :, None]  # [k or 1, 1, T, max(ends)]
        return text(embeds, positions, attn_mask=mask, cache=self.cache.rows(row), cache_positions=positions)

    def _emit(self, requests: list[Request], tokens: torch.Tensor) -> list[StepOutput]:
        """Book the sampled tokens (the step's one host sync), detokenize, check the stop conditions."""
        outputs = []
        for r, token in zip(requests, tokens.tolist()):
            text = ""
            if r.error is None:  # per-request work: an error in it fails this request only
                try:
                    r.output_ids.append(token)
                    text = "" if token in self.end_ids else r.detok.add(token)
                    if token in self.end_ids or r.detok.stopped or (r.matcher is not None and r.matcher.advance(token)):
                        r.finish_reason = "stop"  # an end token, a stop string, or the grammar is complete
                    elif len(r.output_ids) >= r.params.max_new_tokens or r.length >= self.max_len:  # no room left
                        r.finish_reason = "length"
                    if r.finish_reason:
                        text += r.detok.finish()
                except Exception as e:
                    r.fail(e)
                    text = ""
            outputs.append(StepOutput(r.id, [token] if r.error is None else [], text, r.finish_reason,
                                      len(r.prompt), len(r.output_ids), r.cached, r.error))
        self._leave([r for r in requests if r.finish_reason])
        return outputs

    def _leave(self, requests: list[Request]) -> None:
        """Free the slots of `requests` (highest slot first), storing their blocks in the prefix cache; rows are
        moved into the holes so that decoding rows stay 0..d-1 and prefilling ones d..n-1."""
        for r in sorted(requests, key=lambda r: r.slot, reverse=True):
            if self.caches is not None and r.length >= BLOCK:
                sequence = torch.cat([r.prompt.input_ids, torch.tensor(r.output_ids, dtype=torch.long)])
                keys = extend_keys(r.keys, sequence, r.frame_of, r.frames, r.length)
                self.caches.prefix.store(keys[: r.length // BLOCK], self.cache, r.slot, self.model.dtype)
            hole = r.slot
            if r.decoding:  # the last decoding row fills the hole, the last row fills its place
                self.decoding -= 1
                if hole != self.decoding:
                    self._move(self.decoding, hole)
                hole = self.decoding
            last = len(self.running) - 1
            if hole != last:
                self._move(last, hole)
            self.sampler.free(last)
            self.running.pop()
            r.features = []

    def _move(self, src: int, dst: int) -> None:
        """Row `src`'s request (its keys/values, position, last token and sampler state) now lives in row `dst`."""
        moved = self.running[src]
        n = moved.length
        self.cache.k[:, dst, :, :n] = self.cache.k[:, src, :, :n]
        self.cache.v[:, dst, :, :n] = self.cache.v[:, src, :, :n]
        self.pos[dst], self.last[dst] = self.pos[src], self.last[src]
        self.sampler.move(src, dst)
        self.running[dst], moved.slot = moved, dst
