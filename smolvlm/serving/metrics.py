"""Server operations: Prometheus metrics (GET /metrics), one log line per HTTP request and per generation.

Three sources, one registry (`ServerMetrics.registry`, one per app, so several apps in a process don't collide):
- the HTTP layer (an ASGI middleware): requests by route and status, and a log line with the status, the time and,
  for a 4xx/5xx, the error message sent back;
- the engine loop (`Tracker`, called by the Worker's thread as outputs come): prompt and generated tokens, time to
  first token (from submission, so queueing counts), inter-token latency, and a log line per finished generation;
- the Worker's counters (`Worker.metrics`), read at scrape time: every field is exported, `running` / `waiting` /
  `max_decode_batch` as gauges and the rest as counters (`smolvlm_engine_<field>_total`). That is the hook for new
  engine counters such as cache hits: add a field to the Worker's Metrics dataclass and it is scraped.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.responses import Response

from ..generation import StepOutput

log = logging.getLogger("smolvlm.serving")

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize")  # other: "other"
GAUGES = ("running", "waiting", "max_decode_batch", "cache_bytes")  # Worker.metrics fields that go up and down
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80)  # seconds: a 13-tile photo on a CPU takes ~10 s
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1, 2)


class ServerMetrics:
    """The metrics of one server (one or more served models, each with its Worker)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("smolvlm_http_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("smolvlm_prompt_tokens", "Prompt tokens of submitted requests", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("smolvlm_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.finished = Counter("smolvlm_requests_finished", "Generations that ran to the end",
                                ["model", "finish_reason"], registry=r)
        self.ttft = Histogram("smolvlm_time_to_first_token_seconds", "Submission to first token (queueing, vision "
                              "and prefill)", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("smolvlm_inter_token_latency_seconds", "Time between a request's tokens", ["model"],
                             buckets=ITL_BUCKETS, registry=r)
        self.workers: dict = {}  # served model name -> Worker
        r.register(_WorkerCollector(self.workers))

    def tracker(self, model: str) -> Tracker:
        return Tracker(self, model)

    def watch(self, model: str, worker) -> None:
        """Export `worker`'s counters (labelled with `model`) at each scrape."""
        self.workers[model] = worker

    def scrape(self, request=None) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def middleware(self, app):
        """`app` wrapped to count and log every HTTP request (add with `app.add_middleware(metrics.middleware)`)."""
        return _HTTPLog(app, self)


class Tracker:
    """Per-token metrics of one served model, fed by the Worker: `submitted` from the handlers, `stepped` from the
    engine thread, `dropped` from either (dict operations are atomic under the GIL; a request is in one thread at a
    time otherwise)."""

    def __init__(self, metrics: ServerMetrics, model: str):
        self.model = model
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.generation_tokens = metrics.generation_tokens.labels(model)
        self.ttft, self.itl = metrics.ttft.labels(model), metrics.itl.labels(model)
        self.finished = metrics.finished
        self.live: dict[str, list] = {}  # request_id -> [submitted at, first token at, last token at]

    def submitted(self, request_id: str, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.live[request_id] = [time.perf_counter(), None, None]

    def dropped(self, request_id: str) -> None:
        if self.live.pop(request_id, None) is not None:
            log.info("%s: aborted (client gone or server stopping)", request_id)

    def stepped(self, outputs: list[StepOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            times = self.live.get(out.request_id)
            if times is None:
                continue
            start, first, last = times
            self.generation_tokens.inc(len(out.token_ids))
            if first is None:
                self.ttft.observe(now - start)
                times[1] = now
            else:
                self.itl.observe(now - last)
            times[2] = now
            if out.finished:
                del self.live[out.request_id]
                self.finished.labels(self.model, out.finish_reason).inc()
                first = times[1]
                rate = (out.completion_tokens - 1) / (now - first) if now > first else 0.0
                log.info("%s: %d prompt (%d cached) + %d completion tokens, finish %s, first token %.2f s, "
                         "%.1f tok/s, %.2f s", out.request_id, out.prompt_tokens, out.cached_tokens,
                         out.completion_tokens, out.finish_reason, first - start, rate, now - start)


class _WorkerCollector:
    def __init__(self, workers: dict):
        self.workers = workers

    def collect(self):
        families = {}
        for model, worker in self.workers.items():
            for field, value in worker.snapshot().items():
                if field not in families:
                    kind = GaugeMetricFamily if field in GAUGES else CounterMetricFamily
                    families[field] = kind(f"smolvlm_engine_{field}", f"engine loop: {field}", labels=["model"])
                families[field].add_metric([model], value)
        return list(families.values())


class _HTTPLog:
    """ASGI middleware: counts each HTTP request by route and status, and logs it (with the error message of a
    4xx/5xx, read from the OpenAI-format body it sends)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, error = time.perf_counter(), 500, bytearray()

        async def relay(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and len(error) < 4096:
                error.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, relay)
        finally:
            path = scope["path"]
            self.metrics.requests.labels(path if path in ROUTES else "other", str(status)).inc()
            reason = f": {_message(bytes(error))}" if status >= 400 else ""
            log.info("%s %s %d %.0f ms%s", scope["method"], path, status, (time.perf_counter() - start) * 1000,
                     reason)


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace")
