"""POST /tokenize and /detokenize, shaped as vLLM's (outside /v1, like vLLM's; no generation, no engine).

/tokenize takes {"prompt": "..."} (encoded as the processor encodes text: with the tokenizer's special tokens) or
{"messages": [...]} (a chat-completions conversation, media included: the chat template rendered with the generation
prompt and every image expanded to its tile tokens, exactly the prompt a completion would run), and answers
{"count", "max_model_len", "tokens"}. /detokenize takes {"tokens": [...]} and answers {"prompt": text}.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request

from . import parsing
from .inputs import build_prompt, fetch_media
from .protocol import APIError, ChatCompletionRequest, parse_json, parse_request


def _parse(body: bytes) -> tuple[dict, ChatCompletionRequest | None]:
    """The body's JSON object, or its messages as a validated chat request (run by parsing.parse)."""
    data = parse_json(body)
    if "messages" not in data:
        return data, None
    return {}, parse_request(json.dumps({"messages": data["messages"]}).encode())


def add_routes(app: FastAPI, vlm, limits, context: int, read_body) -> None:
    """`read_body(request, limit)`: the server's size-capped body reader."""

    async def parsed(request: Request) -> tuple[dict, ChatCompletionRequest | None]:
        body = await read_body(request, limits.max_body_bytes)
        return await parsing.parse(_parse, body, app.state.text_pool)

    async def prompt_ids(body: dict, chat: ChatCompletionRequest | None) -> list[int]:
        if chat is None and isinstance(body.get("prompt"), str):
            return vlm.processor(text=[body["prompt"]])["input_ids"][0].tolist()
        if chat is None:
            raise APIError("Give 'prompt' (a string) or 'messages' (a chat conversation)", 400, "prompt")
        media = await fetch_media(chat, app.state.fetcher, limits)
        loop = asyncio.get_running_loop()
        pool = app.state.media_pool if media else app.state.text_pool
        prompt = await loop.run_in_executor(pool, build_prompt, vlm.processor, chat, media, limits)
        return prompt.input_ids.tolist()

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        tokens = await prompt_ids(*await parsed(request))
        return {"count": len(tokens), "max_model_len": context, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        tokens = (await parsed(request))[0].get("tokens")
        vocab = vlm.processor.tokenizer.get_vocab_size()
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab for t in tokens):
            raise APIError(f"'tokens' must be a list of token ids (integers in [0, {vocab}))", 400, "tokens")
        return {"prompt": vlm.processor.decode(tokens)}
