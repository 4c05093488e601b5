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

from .inputs import build_prompt, fetch_media
from .protocol import APIError, parse_request


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(f"The request body is not valid JSON: {e}", 400, None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object", 400, None, "invalid_json")
    return body


def add_routes(app: FastAPI, vlm, limits, context: int) -> None:
    async def prompt_ids(body: dict) -> list[int]:
        if isinstance(body.get("prompt"), str) and "messages" not in body:
            return vlm.processor(text=[body["prompt"]])["input_ids"][0].tolist()
        if "messages" not in body:
            raise APIError("Give 'prompt' (a string) or 'messages' (a chat conversation)", 400, "prompt")
        chat = parse_request(json.dumps({"messages": body["messages"]}).encode())
        media = await fetch_media(chat, app.state.fetcher, limits)
        loop = asyncio.get_running_loop()
        pool = app.state.media_pool if media else app.state.text_pool
        prompt = await loop.run_in_executor(pool, build_prompt, vlm.processor, chat, media, limits)
        return prompt.input_ids.tolist()

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        tokens = await prompt_ids(await _json(request))
        return {"count": len(tokens), "max_model_len": context, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        tokens = (await _json(request)).get("tokens")
        vocab = vlm.processor.tokenizer.get_vocab_size()
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab for t in tokens):
            raise APIError(f"'tokens' must be a list of token ids (integers in [0, {vocab}))", 400, "tokens")
        return {"prompt": vlm.processor.decode(tokens)}
