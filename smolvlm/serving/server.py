"""The FastAPI app: OpenAI-compatible routes over one engine loop (worker.py) shared by every request.

A chat completion goes: read the body (size-capped) -> validate (protocol.py) -> fetch media on the event loop
(fetch.py) -> decode, template and tokenize in a thread pool (inputs.py) -> submit to the engine loop -> relay its
outputs (one JSON answer, or server-sent events). Every refusal is an OpenAI-format error; the server keeps serving.
A client that goes away has its request aborted, which frees its batch slot at the next step.

Two pools prepare requests, so that media never delays text: requests with images or videos are decoded in the
media pool, the others in the text pool, which a burst of image-heavy requests can't fill. Bodies over 256 KB are
parsed in a separate process (parsing.py), since parsing holds the interpreter lock the other requests need.

Shutdown (`drain`, called by `smolvlm serve` on SIGTERM / Ctrl-C): uvicorn stops accepting connections and lets the
requests in flight run; those still running shortly before --shutdown-timeout end with a 503 (non-streamed) or, in
a stream, an error event after the tokens sent so far and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..generation import Prompt, SamplingParams, StepOutput
from . import parsing, protocol, tokenize, ui
from .fetch import Fetcher
from .inputs import build_prompt, fetch_media, sampling_params
from .limits import Limits
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest
from .structured import calls_tools, check, grammar, tool_calls
from .worker import Worker

log = logging.getLogger("smolvlm.serving")

TEXT_THREADS = 2  # text-only requests parsed and tokenized at once, beside the engine loop
MEDIA_THREADS = 2  # requests with media decoded at once; more wait their turn
SHUTTING_DOWN = "The server is shutting down"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(vlm, model_name: str, limits: Limits = Limits(), max_batch: int = 8, max_len: int | None = None,
               api_key: str | None = None, metrics: ServerMetrics | None = None, page: bool = True) -> FastAPI:
    """An app serving `vlm` (a `smolvlm.load` result) as `model_name`. `max_len` is the context (prompt + answer) of
    each batch slot, by default the model's (at most 8192); `max_batch` the requests decoded together. `metrics`:
    shared by the apps of one server (serving/adapters.py), else the app's own. `page` serves the browser chat page
    at / (ui.py). `app.state.drain(seconds)` starts a graceful shutdown: requests unfinished after `seconds` get a
    503 error."""
    context = max_len or min(vlm.model.config.text_config.max_position_embeddings, 8192)
    metrics = metrics or ServerMetrics()
    worker = Worker(lambda: vlm.new_engine(max_batch=max_batch, max_len=context),  # shares vlm.caches
                    metrics.tracker(model_name))
    metrics.watch(model_name, worker)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.fetcher = Fetcher(limits)
        app.state.text_pool = ThreadPoolExecutor(TEXT_THREADS, thread_name_prefix="smolvlm-text")
        app.state.media_pool = ThreadPoolExecutor(MEDIA_THREADS, thread_name_prefix="smolvlm-media")
        worker.start()
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish (or cancelled them, aborting their engine requests)
            worker.stop()
            for pool in (app.state.text_pool, app.state.media_pool):
                pool.shutdown(wait=False, cancel_futures=True)
            parsing.shutdown()
            await app.state.fetcher.aclose()

    app = FastAPI(title="smolvlm", lifespan=lifespan)
    app.add_middleware(metrics.middleware)
    app.add_api_route("/metrics", metrics.scrape, methods=["GET"])  # Prometheus text format
    tokenize.add_routes(app, vlm, limits, context, _read_body)

    closing = asyncio.Event()  # set at the shutdown deadline: every request still in flight ends with a 503

    def drain(seconds: float) -> None:
        loop = asyncio.get_running_loop()

        def expire() -> None:
            log.warning("shutdown deadline: ending the requests still in flight with a 503")
            closing.set()
            error = APIError(f"{SHUTTING_DOWN}: the request did not finish before the shutdown deadline", 503, None,
                             "server_shutting_down", "server_error")
            loop.run_in_executor(None, lambda: worker.stop(error=error))  # stop() waits for the loop thread

        loop.call_later(seconds, expire)

    app.state.drain = drain

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError("Missing API key: send the header 'Authorization: Bearer <key>'", 401, None,
                           "invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError("Incorrect API key provided", 401, None, "invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(message, e.status_code, None, code).body(), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return JSONResponse(APIError(f"Internal server error ({type(e).__name__}); see the server log", 500, None,
                                     None, "server_error").body(), 500)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "max_batch": max_batch,
                "context": context, **worker.snapshot(),
                "caches": None if vlm.caches is None else vlm.caches.snapshot()}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return protocol.model_list(model_name, created)

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(name: str) -> dict:
        if name != model_name:
            raise _unknown_model(name, model_name)
        return protocol.model_list(model_name, created)["data"][0]

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        loop = asyncio.get_running_loop()
        try:
            body = await _read_body(request, limits.max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=499)
        chat = await parsing.parse(protocol.parse_request, body, app.state.text_pool)
        if chat.model is not None and chat.model != model_name:
            raise _unknown_model(chat.model, model_name)
        if not worker.alive:
            raise APIError(SHUTTING_DOWN, 503, None, "server_shutting_down", "server_error")

        async def prepare() -> tuple[Prompt, SamplingParams]:
            await loop.run_in_executor(app.state.text_pool, check, vlm, grammar(chat), chat)  # a bad schema: 400 first
            media = await fetch_media(chat, app.state.fetcher, limits)
            pool = app.state.media_pool if media else app.state.text_pool
            prompt = await loop.run_in_executor(pool, build_prompt, vlm.processor, chat, media, limits,
                                                None if vlm.caches is None else vlm.caches.images)
            return prompt, sampling_params(chat, len(prompt), context, limits)

        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            if chat.stream:
                prompt, params = await _unless_disconnected(request, prepare(), closing)
                events = _sse(worker, request_id, prompt, params, model_name, chat)
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

            async def answer() -> dict:
                prompt, params = await prepare()
                text, last = "", None
                async with aclosing(_outputs(worker, request_id, prompt, params)) as outputs:
                    async for last in outputs:
                        text += last.text
                calls = tool_calls(chat, text) if calls_tools(chat) and last.finish_reason == "stop" else None
                return protocol.completion(request_id, model_name, text, last.finish_reason, len(prompt),
                                           last.completion_tokens, calls, last.cached_tokens)

            return JSONResponse(await _unless_disconnected(request, answer(), closing))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the request's work was cancelled and aborted

    app.include_router(ui.router(vlm.processor, limits, context, authorize, _read_body, page))
    return app


async def _read_body(request: Request, limit: int, option: str = "--max-body-mb") -> bytes:
    """The body, reading no more than `limit` bytes of it (413 beyond, naming the server `option` that raises it)."""
    too_large = APIError(f"The request body is larger than {limit} bytes ({option})", 413, None,
                         "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _unknown_model(name: str, served: str) -> APIError:
    return APIError(f"The model {name!r} does not exist; this server serves {served!r}", 404, "model",
                    "model_not_found")


async def _unless_disconnected(request: Request, work, closing: asyncio.Event):
    """Run `work` (a coroutine); if the client disconnects first, cancel it and raise ClientGone; if the shutdown
    deadline comes first, cancel it and raise a 503."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    deadline = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait({task, watcher, deadline}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled: the work is cancelled with it
        watcher.cancel()
        deadline.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let its clean-up (the abort) run
    if task.cancelled():
        if closing.is_set():
            raise APIError(f"{SHUTTING_DOWN}: the request did not finish before the shutdown deadline", 503, None,
                           "server_shutting_down", "server_error")
        raise ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so receive() only reports that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _outputs(worker: Worker, request_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[StepOutput]:
    """Submit the request to the engine loop and yield its outputs; stopping early (the client went away) aborts it."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    try:
        worker.submit(request_id, prompt, params, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
    except RuntimeError:
        raise APIError(SHUTTING_DOWN, 503, None, "server_shutting_down", "server_error") from None
    finished = False
    try:
        while not finished:
            item = await queue.get()
            if isinstance(item, APIError):  # the shutdown deadline
                finished = True
                raise item
            if isinstance(item, Exception):
                finished = True
                raise APIError(f"The engine failed while generating ({type(item).__name__}: {item}); the request was "
                               "dropped", 500, None, None, "server_error")
            finished = item.finished
            if item.error is not None:  # this request's own work failed in a shared step; the others went on
                raise APIError(f"Generating this answer failed ({item.error}); the request was dropped", 500, None,
                               None, "server_error")
            yield item
    finally:
        if not finished:
            worker.abort(request_id)


async def _sse(worker: Worker, request_id: str, prompt: Prompt, params: SamplingParams, model_name: str,
               chat: ChatCompletionRequest) -> AsyncIterator[str]:
    """The answer as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    created = int(time.time())
    with_usage = chat.stream_options is not None and chat.stream_options.include_usage

    def event(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chunk(delta: dict, finish: str | None = None) -> str:
        return event(protocol.chunk(request_id, model_name, created, delta, finish, with_usage))

    yield chunk({"role": "assistant", "content": ""})
    tools, held = calls_tools(chat), ""  # a tool call is sent whole once complete (its text is held until then)
    try:
        async with aclosing(_outputs(worker, request_id, prompt, params)) as outputs:
            async for out in outputs:
                if tools:
                    held += out.text
                elif out.text:
                    yield chunk({"content": out.text})
                if not out.finished:
                    continue
                calls = tool_calls(chat, held) if tools and out.finish_reason == "stop" else None
                if calls:
                    yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
                elif held:
                    yield chunk({"content": held})
                yield chunk({}, "tool_calls" if calls else out.finish_reason)
                if with_usage:
                    yield event(protocol.usage_chunk(request_id, model_name, created, len(prompt),
                                                     out.completion_tokens, out.cached_tokens))
    except APIError as e:  # the status line is gone already: report it in the stream, as OpenAI does
        yield event(e.body())
    yield "data: [DONE]\n\n"
