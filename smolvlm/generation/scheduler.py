"""What each engine step works on: the queue of requests waiting for a cache slot, aborts, and the prefill budget.

Admission is first come first served, except that a request whose prompt starts with at least SHARE_BLOCKS blocks
another request is prefilling right now waits for that prefill to end: then its blocks are in the prefix cache and
the shared part is copied instead of computed again (8 questions about one photo in one batch prefill the photo
once).

Chunked prefill. While requests are decoding, one step prefills at most `prefill_chunk` prompt tokens and runs at most
`vision_layers` vision-encoder frame-layers (vision_steps.py: a pass over a few tiles spread over steps), so a long
prompt (many tiles, a video) joins the batch over several steps and the running streams keep getting a token per step. A
chunk stops before the first frame whose features are not at hand yet. With nothing decoding, the whole prompts are
prefilled in one step, their frames in one vision batch: chunks would only add steps. prefill_chunk=None turns chunking
off.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .constraints import Matcher
from .detokenizer import Detokenizer
from .sampling import SamplingParams

SHARE_BLOCKS = 4  # shared prefix blocks that make a request wait for another one's prefill


@dataclass
class Request:
    id: str
    prompt: "Prompt"  # noqa: F821 (prompt.Prompt)
    params: SamplingParams
    detok: Detokenizer
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    length: int = 0  # tokens in the cache row (prefilled so far; then the host copy of Engine.pos[slot])
    decoding: bool = False  # prefill done, the first token sampled
    finish_reason: str | None = None
    matcher: Matcher | None = None  # the parser of a constrained answer (params.grammar)
    cached: int = 0  # prompt tokens copied from the prefix cache
    frames: list[bytes] | None = None  # content key of each image frame (caches on)
    frame_of: torch.Tensor | None = None  # [T] the frame each prompt token shows, -1 for text (prompts with images)
    images_before: torch.Tensor | None = None  # [T + 1] image tokens before each position
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks known so far
    features: list[torch.Tensor | None] = field(default_factory=list)  # per frame [N, D], while prefilling
    error: str | None = None  # what failed this request alone (finish_reason "error")

    def fail(self, e: Exception) -> None:
        """This request's own work failed inside a shared step: it ends alone with finish_reason "error"."""
        self.finish_reason, self.error = "error", f"{type(e).__name__}: {e}"

    def image_tokens(self, start: int, end: int) -> int:
        """How many of prompt positions start..end-1 are image tokens."""
        return 0 if self.images_before is None else int(self.images_before[end] - self.images_before[start])

    def shows(self, start: int, end: int) -> list[int]:
        """The frames whose image tokens lie in prompt positions start..end-1, in order."""
        if self.frame_of is None:
            return []
        shown = self.frame_of[start:end]
        return torch.unique_consecutive(shown[shown >= 0]).tolist()


PAD_SLACK = 128  # padding tokens a prefill run may carry (padding_runs): ~the cost of one more pass over the weights


class Scheduler:
    """The waiting queue and aborts (any thread, under `lock`) and the per-step prefill plan (the loop thread)."""

    def __init__(self, prefill_chunk: int | None, vision_layers: int):
        if prefill_chunk is not None and not (isinstance(prefill_chunk, int) and prefill_chunk >= 1):
            raise InputError(f"prefill_chunk={prefill_chunk!r}: expected an integer >= 1 (tokens per step) or None")
        if not (isinstance(vision_layers, int) and vision_layers >= 1):
            raise InputError(f"vision_layers={vision_layers!r}: expected an integer >= 1 (frame-layers per step)")
        self.prefill_chunk, self.vision_layers = prefill_chunk, vision_layers
        self.waiting: deque[Request] = deque()
        self.aborted: set[str] = set()
        self.lock = threading.Lock()  # guards waiting/aborted: a server thread adds while another one steps

    def queue(self, requests: list[Request], running: list[Request]) -> None:
        with self.lock:
            taken = {r.id for r in itertools.chain(self.waiting, running)}
            for r in requests:
                if r.id in taken:
                    raise InputError(f"Request id {r.id!r} is already in use")
                taken.add(r.id)
            self.waiting.extend(requests)

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborted.add(request_id)

    def take_aborted(self, running: list[Request]) -> list[Request]:
        """The aborted requests, running or waiting (dropped from the queue)."""
        with self.lock:
            aborted, self.aborted = self.aborted, set()
            dropped = [r for r in itertools.chain(self.waiting, running) if r.id in aborted]
            if dropped:
                self.waiting = deque(r for r in self.waiting if r.id not in aborted)
        return dropped

    def admit(self, free: int, prefilling: list[Request]) -> list[Request]:
        """Up to `free` waiting requests, in order, passing over those that share SHARE_BLOCKS blocks with a prompt
        being prefilled (by `prefilling` or one admitted before them)."""
        busy = {k for r in prefilling for k in r.keys}
        admitted, kept = [], deque()
        with self.lock:
            while self.waiting and len(admitted) < free:
                r = self.waiting.popleft()
                if len(r.keys) >= SHARE_BLOCKS and r.keys[SHARE_BLOCKS - 1] in busy:
                    kept.append(r)
                    continue
                busy.update(r.keys)
                admitted.append(r)
            self.waiting.extendleft(reversed(kept))
        return admitted

    def chunked(self, decoding: int) -> bool:
        """Whether this step's prefill goes in chunks (some requests decode, and chunking is on)."""
        return decoding > 0 and self.prefill_chunk is not None

    def plan(self, prefilling: list[Request], chunked: bool, ready) -> list[int]:
        """Where this step's prefill of each of the first len(result) `prefilling` requests ends (a prompt
        position); `ready(request, frame)` says whether a frame's features are at hand (chunks stop before one that
        is not). Every request but the last planned one is prefilled to its end, so the finished ones come first."""
        if not chunked:
            return [len(r.prompt) for r in prefilling]
        tokens, ends = self.prefill_chunk, []
        for r in prefilling:
            end = min(len(r.prompt), r.length + tokens)
            for f in r.shows(r.length, end):
                if not ready(r, f):  # stop before this frame's first token
                    end = r.length + int((r.frame_of[r.length : end] == f).nonzero()[0])
                    break
            if end <= r.length:
                break
            ends.append(end)
            tokens -= end - r.length
            if tokens == 0 or end < len(r.prompt):
                break
        return ends

    @staticmethod
    def padding_runs(lengths: list[int], slack: int = PAD_SLACK) -> list[range]:
        """This step's chunks (their lengths, in row order) as runs of consecutive rows prefilled together, each
        right-padded to its longest chunk: a row joins the run before it while the run's padding stays within
        `slack` tokens. A 1-tile photo beside a 13-tile one (~90 and ~900 tokens) would otherwise be prefilled as 900;
        rows alone are prefilled as fast per token (the kernels' prefill matmuls run on AMX tiles or register tiles
        of 8 rows), and give the same bits (a row's results don't depend on its batch)."""
        runs, first = [], 0
        for i in range(1, len(lengths) + 1):
            run = lengths[first : i + 1]
            if i == len(lengths) or max(run) * len(run) - sum(run) > slack:
                runs.append(range(first, i))
                first = i
        return runs
