"""Chat messages -> prompt text: message normalisation, the media the messages hold, and the checkpoint's Jinja
chat template rendered in a sandbox the way transformers renders it.

Messages are `{"role": ..., "content": [blocks]}` with blocks `{"type": "text", "text": ...}`,
`{"type": "image", "image"|"url"|"path"|"base64": ...}`, the OpenAI form
`{"type": "image_url", "image_url": {"url": ...}}`, or `{"type": "video", "video"|"url"|"path": ...}`.

One deliberate difference from the reference: a message whose content is a plain string is treated as a single text
block. (The checkpoints' template iterates over the content, so the reference renders a string's text as nothing.)
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ConfigError, InputError

IMAGE_KEYS = ("image", "url", "path", "base64")  # where an image block keeps its source, in the reference's order
VIDEO_KEYS = ("video", "url", "path")


def normalize_conversations(conversation) -> tuple[list[list[dict]], bool]:
    """(conversations, batched): a copy of the messages in the one form the template and the media collector read.

    A list of conversations (lists of messages) is a batch. Keys whose value is None are dropped (OpenAI-style
    clients send `content: None`), OpenAI `image_url` blocks become image blocks, string content becomes one text
    block, and every message and block is checked.
    """
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts (or a list of such "
                         "lists for a batch)")
    batched = isinstance(conversation[0], (list, tuple))
    conversations = conversation if batched else [conversation]
    out = []
    for c, messages in enumerate(conversations):
        where = f"conversation {c}, " if batched else ""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError(f"{where.rstrip(', ') or 'messages'}: expected a non-empty list of messages")
        out.append([_message(m, f"{where}message {i}") for i, m in enumerate(messages)])
    return out, batched


def _message(message, where: str) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise InputError(f"{where}: expected a dict with a string 'role' and a 'content', got {message!r:.200}")
    message = {k: v for k, v in message.items() if v is not None}
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = [{"type": "text", "text": content}]
    elif isinstance(content, (list, tuple)):
        message["content"] = [_block(b, f"{where}, item {j}") for j, b in enumerate(content)]
    elif "content" in message:
        raise InputError(f"{where}: content must be a string or a list of blocks, got {type(content).__name__}")
    return message


def _block(block, where: str) -> dict:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise InputError(f"{where}: expected a dict with a string 'type' (text, image, image_url, video), got "
                         f"{block!r:.200}")
    block = {k: v for k, v in block.items() if v is not None}
    if block["type"] == "image_url":
        url = block.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise InputError(f"{where}: an image_url block needs {{'image_url': {{'url': ...}}}}")
        return {"type": "image", "url": url}
    if block["type"] == "text" and not isinstance(block.get("text"), str):
        raise InputError(f"{where}: a text block needs a string 'text'")
    return block


def has_video(conversations: list[list[dict]]) -> bool:
    return any(b["type"] == "video" for messages in conversations for m in messages for b in m.get("content", ()))


def collect_media(conversations: list[list[dict]]) -> tuple[list[list], list[list]]:
    """(images, videos): the sources of the image and video blocks of each conversation, in order."""
    images, videos = [], []
    for c, messages in enumerate(conversations):
        found = {"image": [], "video": []}
        for i, message in enumerate(messages):
            for j, block in enumerate(message.get("content", ())):
                keys = {"image": IMAGE_KEYS, "video": VIDEO_KEYS}.get(block["type"])
                if keys is None:
                    continue
                source = next((block[k] for k in keys if k in block), None)
                if source is None:
                    where = (f"conversation {c}, " if len(conversations) > 1 else "") + f"message {i}, item {j}"
                    raise InputError(f"{where}: an {block['type']} block needs one of the keys {', '.join(keys)}")
                found[block["type"]].append(source)
        images.append(found["image"])
        videos.append(found["video"])
    return images, videos


def render(template: str, conversations: list[list[dict]], add_generation_prompt: bool, **variables) -> list[str]:
    """Render the template once per conversation, with `variables` (special tokens, extra template arguments)."""
    compiled = _compile(template)
    variables = _plain(variables)
    try:
        return [
            compiled.render(messages=_plain(messages), tools=None, documents=None,
                            add_generation_prompt=add_generation_prompt, **variables)
            for messages in conversations
        ]
    except jinja2.TemplateError as e:
        raise InputError(f"The chat template can't render these messages: {e}") from e


def _plain(value):
    """Plain JSON-like data (the reference's `_plain_template_data`): images, arrays and other objects become inert
    placeholders like "<Image>", so the template can't call their methods (some of which write files)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for kind in (str, int, float):  # subclasses (enums, numpy scalars...) back to the base type
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore-prefixed attributes (a sandbox hardening transformers also applies)."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates can't set namespace attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The template compiled in transformers' environment: immutable sandbox, trim_blocks, lstrip_blocks."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"The checkpoint's chat template is not valid Jinja (line {e.lineno}): {e.message}") from e
