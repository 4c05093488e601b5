"""`smolvlm serve --lora-modules name=path ...`: several LoRA adapters (and the base model) served at once, chosen by
each request's `model` field, as vLLM's --lora-modules.

Design: each adapter is merged into its own copy of the base weights (smolvlm/adapters.py) and served by its own app
(server.py's create_app: its own engine loop and KV cache); this ASGI router sends each request to the app of the
name it asks for. It costs one model copy and one KV cache per adapter (the 256M model: about 0.5 GB of bf16 weights
each) and nothing per token: every request runs at the base model's speed, and no engine code changes. (Batched
per-row LoRA would share one copy and one batch across adapters at a per-token cost; not done.)

Routing: /v1/chat/completions by the body's "model" (none: the base model), /v1/models/NAME by NAME, /v1/models
answers the list of every served name; the rest (/health, /metrics with every model's series, /tokenize...) goes to
the base model's app. Unknown names reach the base app, which answers OpenAI's 404 model_not_found.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack

from . import parsing
from .protocol import model_list

CHAT = "/v1/chat/completions"


class Router:
    """ASGI app over {served name: app}; the first one is the base model's."""

    def __init__(self, apps: dict, max_body_bytes: int):
        self.apps, self.max_body_bytes = apps, max_body_bytes
        self.base = next(iter(apps.values()))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return await self.base(scope, receive, send)
        path = scope["path"]
        if path.startswith("/v1/models/"):
            return await self.apps.get(path.removeprefix("/v1/models/"), self.base)(scope, receive, send)
        if path == "/v1/models":
            return await self.base(scope, receive, self._listing(send))
        if path != CHAT:
            return await self.base(scope, receive, send)
        body, messages = await _read(receive, self.max_body_bytes)
        model = await parsing.parse(_model, body) if body is not None else None  # off the loop (parsing.py)
        app = self.apps.get(model, self.base)  # too large: the base app answers 413

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await app(scope, replay, send)

    def _listing(self, send):
        """`send` with a 200 /v1/models answer replaced by the list of every served name."""
        start = {}

        async def relay(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if start.get("status") == 200:
                body = json.loads(message["body"])
                body["data"] = [model_list(name, body["data"][0]["created"])["data"][0] for name in self.apps]
                message = {**message, "body": json.dumps(body).encode()}
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                start["headers"] = headers + [(b"content-length", str(len(message["body"])).encode())]
            await send(start)
            await send(message)

        return relay

    async def _lifespan(self, receive, send):
        """Start every app's engine loop (their lifespans) and stop them all at shutdown."""
        await receive()  # lifespan.startup
        async with AsyncExitStack() as stack:
            try:
                for app in self.apps.values():
                    await stack.enter_async_context(app.router.lifespan_context(app))
            except Exception as e:
                await send({"type": "lifespan.startup.failed", "message": repr(e)})
                return
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})


async def _read(receive, limit: int) -> tuple[bytes | None, list[dict]]:
    """The request body (None past `limit` bytes: no more is read) and the ASGI messages that carried it, to replay
    to the chosen app."""
    body, messages = bytearray(), []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return bytes(body), messages
        body += message.get("body", b"")
        if len(body) > limit:
            return None, messages
        if not message.get("more_body"):
            return bytes(body), messages


def _model(body: bytes) -> str | None:
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None
