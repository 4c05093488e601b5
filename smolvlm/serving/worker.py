"""The engine loop: one thread steps the Engine while any request is unfinished, and hands each step's outputs to the
requests' sinks (the HTTP handlers, on the asyncio loop). Requests join and leave the running batch at token
boundaries, so concurrent users share decode steps instead of queueing behind each other.

The handlers only call `submit` and `abort`, which are thread-safe and quick (the prompt is prepared beforehand, in
a thread pool); everything that touches the model happens in the loop thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..generation import Engine, Prompt, SamplingParams, StepOutput

log = logging.getLogger("smolvlm.serving")

Sink = Callable[[StepOutput | Exception], None]  # called from the loop thread; must not block


@dataclass
class Metrics:
    """Counters of the engine loop, shown by GET /health and exported by GET /metrics (metrics.py)."""

    running: int = 0  # requests holding a KV-cache slot now
    waiting: int = 0  # requests queued for a slot now
    steps: int = 0  # engine steps run
    tokens: int = 0  # tokens generated
    finished: int = 0  # requests that ran to the end (aborted ones excluded)
    max_decode_batch: int = 0  # most requests decoded together by one step
    shared_steps: int = 0  # steps that decoded more than one request (continuous batching at work)
    prompt_tokens: int = 0  # prompt tokens of the finished requests
    cached_tokens: int = 0  # of those, the ones whose keys/values came from the prefix cache
    image_cache_hits: int = 0  # image frames whose features came from the feature cache (the model's engines)
    image_cache_misses: int = 0  # image frames encoded
    cache_bytes: int = 0  # held by the prefix, image-feature and processed-image caches now


class Worker:
    """Owns the Engine and the thread that steps it. `make_engine` builds it (again, after a step fails).
    `tracker` (metrics.py) hears of each submitted, stepped and dropped request."""

    def __init__(self, make_engine: Callable[[], Engine], tracker=None):
        self.make_engine = make_engine
        self.tracker = tracker
        self.engine = make_engine()
        self.sinks: dict[str, Sink] = {}
        self.lock = threading.Lock()  # guards sinks, stopping and swapping the engine
        self.wake = threading.Event()
        self.stopping = False
        self.metrics = Metrics()
        self.thread = threading.Thread(target=self._run, name="smolvlm-engine", daemon=True)

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def start(self) -> None:
        self.thread.start()

    def submit(self, request_id: str, prompt: Prompt, params: SamplingParams, sink: Sink) -> None:
        """Queue a prepared prompt; `sink` gets every StepOutput of it (the last one finished), or an Exception if
        the engine fails. Raises RuntimeError when the loop is not running."""
        with self.lock:
            if not self.alive:
                raise RuntimeError("the engine loop is not running")
            self.engine.add_request(prompt, params, request_id)
            self.sinks[request_id] = sink
            if self.tracker:
                self.tracker.submitted(request_id, len(prompt))
        self.wake.set()

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away): its slot is freed at the next step and its sink hears no more."""
        with self.lock:
            if self.sinks.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                if self.tracker:
                    self.tracker.dropped(request_id)
        self.wake.set()

    def stop(self, timeout: float = 10.0, error: Exception | None = None) -> None:
        """Abort whatever is left (its sinks get `error`, if given), let the loop drop it and end."""
        with self.lock:
            self.stopping = True
            sinks, self.sinks = self.sinks, {}
            for request_id in sinks:
                self.engine.abort(request_id)
        if error is not None:
            for sink in sinks.values():
                self._send(sink, error)
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def snapshot(self) -> dict:
        return asdict(self.metrics)

    def _run(self) -> None:
        while True:
            self.wake.clear()  # before looking for work: a submit from now on sets it again
            if not self.engine.has_unfinished():
                if self.stopping:
                    return
                self.wake.wait()
                continue
            decoding = self.engine.decoding  # the rows this step decodes (this thread alone changes them)
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug or out of memory: fail this batch, keep serving with a fresh engine
                log.exception("engine step failed; failing %d request(s) and rebuilding the engine", len(self.sinks))
                self._reset(e)
                continue
            self._record(decoding, outputs)
            if self.tracker:
                self.tracker.stepped(outputs)
            for out in outputs:
                with self.lock:
                    sink = self.sinks.pop(out.request_id, None) if out.finished else self.sinks.get(out.request_id)
                if sink is not None:
                    self._send(sink, out)

    def _record(self, decoding: int, outputs: list[StepOutput]) -> None:
        m = self.metrics
        m.steps += 1
        m.tokens += len(outputs)
        for out in outputs:
            if out.finished:
                m.finished += 1
                m.prompt_tokens += out.prompt_tokens
                m.cached_tokens += out.cached_tokens
        m.max_decode_batch = max(m.max_decode_batch, decoding)
        m.shared_steps += decoding > 1
        m.running, m.waiting = len(self.engine.running), len(self.engine.waiting)
        caches = self.engine.caches
        if caches is not None:
            m.image_cache_hits, m.image_cache_misses = caches.features.hits, caches.features.misses
            m.cache_bytes = caches.bytes

    def _reset(self, error: Exception) -> None:
        with self.lock:
            sinks, self.sinks = self.sinks, {}
            self.engine = None  # free the old KV cache before allocating a new one
            self.engine = self.make_engine()
        self.metrics.running = self.metrics.waiting = 0
        for request_id, sink in sinks.items():
            if self.tracker:
                self.tracker.dropped(request_id)
            self._send(sink, error)

    @staticmethod
    def _send(sink: Sink, item) -> None:
        try:
            sink(item)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
            pass
