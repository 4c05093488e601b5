"""Training data: JSONL conversations (other formats: `formats`) -> checked records -> model inputs with labels on the assistant's tokens only.

One record per line: `{"messages": [{"role": "user", "content": [{"type": "image", "path": "cat.png"},
{"type": "text", "text": "What is this?"}]}, {"role": "assistant", "content": "A cat."}]}` (the chat format; string
content is one text block). Images are file paths (relative to the JSONL file), http(s) or data URLs, or base64;
videos (SmolVLM2) are file paths, http(s) URLs or base64 data URLs.

Reading (`read_jsonl`) checks everything that can be checked without decoding pixels -- JSON, messages, that there is
an assistant turn, that local files exist and images are images -- and names the line of any bad record. Encoding
(`encode`) renders the conversation with the checkpoint's chat template, expands `<image>` / `<video>` as the
processor does and tokenizes once; `labels` keep the tokens the assistant turns add after the generation prompt
("Assistant:"), i.e. " A cat.<end_of_utterance>\\n", and are -100 everywhere else (system and user turns, image and
video tokens, padding).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from ..processing import Processor, load_image
from ..processing.chat import IMAGE_KEYS, VIDEO_KEYS, normalize_conversations
from ..processing.prompt import image_prompt
from ..processing.video import VIDEO_TOKEN, expand_videos

IGNORE = -100  # the label of tokens that carry no loss
URL_PREFIXES = ("http://", "https://", "data:")
BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\n\r")


@dataclass
class Record:
    """One checked conversation: its rendered text, the assistant spans in it, and its image sources."""

    source: str  # "train.jsonl, line 7": where errors point
    text: str  # the chat template's rendering, with one `<image>` per image
    spans: list[tuple[int, int]]  # [start, end) character ranges of `text` that carry loss
    images: list  # absolute paths, URLs or base64 strings (PIL images or bytes from a `datasets` table), in order
    videos: list[str]  # absolute paths or URLs (a conversation has images or videos, not both)


@dataclass
class Example:
    input_ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T], IGNORE outside the assistant's tokens
    pixel_values: torch.Tensor | None  # [I, 3, M, M]
    pixel_attention_mask: torch.Tensor | None  # [I, M, M]


class BadRecord(InputError):
    """A record that can't be used; the message starts with its file and line."""


def read_jsonl(path: str | os.PathLike, processor: Processor, skip_bad_records: bool = False,
               to_messages=None) -> tuple[list[Record], list[BadRecord]]:
    """(records, skipped) of a JSONL file (or a JSON array of records). `to_messages(data, where)` turns a record into
    chat messages (default: our {"messages": [...]}). Without `skip_bad_records` the first bad record raises."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Data file {path} not found")
    records, bad = [], []
    for where, data in json_records(path):
        try:
            if isinstance(data, BadRecord):
                raise data
            records.append(check_record((to_messages or messages_of)(data, where), where, path.parent, processor))
        except BadRecord as e:
            if not skip_bad_records:
                raise
            bad.append(e)
    if not records:
        raise InputError(f"{path} holds no usable records" + (f" ({len(bad)} bad ones were skipped; the first: {bad[0]})"
                                                               if bad else ""))
    return records, bad


def json_records(path: Path):
    """(where, parsed record or its BadRecord) of each line of a JSONL file, or each item of a file holding one JSON
    array (LLaVA's instruction files are one)."""
    with path.open("rb") as f:
        if f.read(64).lstrip()[:1] == b"[":
            f.seek(0)
            try:
                items = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"{path}: starts with '[' but is not a valid JSON array ({e})") from e
            yield from ((f"{path}, record {i}", item) for i, item in enumerate(items))
            return
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield f"{path}, line {number}", _parse(raw, f"{path}, line {number}")


def _parse(raw: bytes, where: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return BadRecord(f"{where}: not UTF-8 text (byte {e.start + 1} is {raw[e.start:e.start + 1]!r})")
    except json.JSONDecodeError as e:
        return BadRecord(f"{where}: not valid JSON ({e.msg} at column {e.colno})")


def messages_of(data, where: str) -> list:
    """Our format: {"messages": [...]}."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        hint = " (a ShareGPT/LLaVA record: pass --data-format sharegpt)" if isinstance(data, dict) and \
            "conversations" in data else ""
        raise BadRecord(f'{where}: expected an object {{"messages": [...]}}{hint}, got {json.dumps(data)[:120]!r}')
    return data["messages"]


def check_record(messages: list, where: str, base: Path, processor: Processor) -> Record:
    """A checked Record of chat messages (images by path relative to `base`, URL, base64 or an image object)."""
    try:
        (messages,), _ = normalize_conversations([messages])
    except InputError as e:
        raise BadRecord(f"{where}: {str(e).replace('conversation 0, ', '')}") from e
    media = {"image": [], "video": []}
    for i, message in enumerate(messages):
        for j, block in enumerate(message.get("content", ())):
            if block["type"] in media:
                media[block["type"]].append(_media_source(block, f"{where}: message {i}, item {j}", base))
    images, videos = media["image"], media["video"]
    if images and videos:
        raise BadRecord(f"{where}: a conversation can hold images or videos, not both (the processor takes one kind)")
    if videos and processor.family != "smolvlm":
        raise BadRecord(f"{where}: videos need a SmolVLM2 checkpoint; this one is SmolVLM v1 (idefics3)")
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise BadRecord(f"{where}: no assistant message, so nothing to learn (the loss is on assistant turns only)")
    if assistant[0] == 0:
        raise BadRecord(f"{where}: the conversation starts with the assistant; put the user's turn first")
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=False)
        spans = [_span(processor, messages, i, text, where) for i in assistant]
    except InputError as e:
        raise BadRecord(f"{where}: {e}") from e
    for marker, sources, kind in ((processor.image_tokens.image, images, "images"), (VIDEO_TOKEN, videos, "videos")):
        if text.count(marker) != len(sources):
            raise BadRecord(f"{where}: the text holds {text.count(marker)} {marker} markers for {len(sources)} {kind}; "
                            f"{marker} is reserved for {kind}")
    return Record(where, text, spans, images, videos)


def _span(processor: Processor, messages: list[dict], i: int, text: str, where: str) -> tuple[int, int]:
    """The characters the assistant turn `i` adds after the generation prompt."""
    prompt = processor.apply_chat_template(messages[:i], add_generation_prompt=True)
    through = processor.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
    if not (through.startswith(prompt) and text.startswith(through)):
        raise BadRecord(f"{where}: the chat template does not render message {i} as a continuation of the earlier ones, "
                        "so its tokens can't be told apart")
    return len(prompt), len(through)


def _media_source(block: dict, where: str, base: Path) -> str:
    """An image or video block's source: a checked absolute path, a URL, or (images only) base64 data."""
    kind = block["type"]
    keys = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
    key = next((k for k in keys if k in block), None)
    if key is None:
        raise BadRecord(f"{where}: an {kind} block needs one of the keys {', '.join(keys)}")
    source = block[key]
    if kind == "image" and isinstance(source, (Image.Image, bytes)):  # from a `datasets` image column
        return source
    if not isinstance(source, str):
        raise BadRecord(f"{where}: the {kind}'s {key!r} must be a string (a path, URL or base64), got "
                        f"{type(source).__name__}")
    if key in ("url", "base64") or source.startswith(URL_PREFIXES):
        return source
    path = (base / source).expanduser()
    if path.is_file():
        if kind == "image":
            try:
                with Image.open(path):
                    pass
            except (UnidentifiedImageError, OSError) as e:
                raise BadRecord(f"{where}: image file {path} is not an image Pillow can read ({e})") from e
        return str(path)
    if kind == "video" or key == "path" or not set(source) <= BASE64_CHARS:
        raise BadRecord(f"{where}: {kind} file {source!r} not found (looked for {path})")
    return source  # base64: decoded (and checked) when the record is encoded


def encode(record: Record, processor: Processor) -> Example:
    """The model inputs of a record, labels included (errors name the record's line)."""
    pixel_values = pixel_attention_mask = None
    blocks, marker = [], processor.image_tokens.image
    try:
        if record.images:
            batch = processor.image_processor([[load_image(s) for s in record.images]])
            pixel_values, pixel_attention_mask = batch.pixel_values[0], batch.pixel_attention_mask[0]
            blocks = [image_prompt(r, c, processor.image_seq_len, processor.image_tokens)
                      for r, c in zip(batch.rows[0], batch.cols[0])]
        elif record.videos:
            # The processor's own expansion of the videos, one per "\0"-separated marker (prompts never hold "\0").
            texts, pixels = expand_videos(processor, ["\0".join([VIDEO_TOKEN] * len(record.videos))], [record.videos])
            pixel_values, pixel_attention_mask = pixels["pixel_values"][0], pixels["pixel_attention_mask"][0]
            blocks, marker = texts[0].split("\0"), VIDEO_TOKEN
    except InputError as e:
        raise BadRecord(f"{record.source}: {e}") from e
    text, spans, media_spans = _expand(record.text, record.spans, blocks, marker)
    encoding = processor.tokenizer.encode(text)
    starts = np.array([start for start, _ in encoding.offsets], dtype=np.int64)  # [T] first character of each token
    keep = np.zeros(len(starts), dtype=bool)
    for a, b in spans:
        keep |= (starts >= a) & (starts < b)
    for a, b in media_spans:  # an image inside an assistant turn is input, not output
        keep &= ~((starts >= a) & (starts < b))
    input_ids = torch.tensor(encoding.ids, dtype=torch.int64)
    labels = torch.where(torch.from_numpy(keep), input_ids, IGNORE)
    return Example(input_ids, labels, pixel_values, pixel_attention_mask)


def _expand(text: str, spans: list[tuple[int, int]], blocks: list[str], marker: str):
    """(expanded text, spans moved into it, character ranges of the blocks): the i-th `marker` becomes blocks[i]."""
    at = [m.start() for m in re.finditer(re.escape(marker), text)]
    growth = [len(block) - len(marker) for block in blocks]

    def moved(p: int) -> int:
        return p + sum(g for s, g in zip(at, growth) if s < p)

    pieces = text.split(marker)
    expanded = pieces[0] + "".join(block + piece for block, piece in zip(blocks, pieces[1:]))
    block_spans = [(moved(s), moved(s) + len(block)) for s, block in zip(at, blocks)]
    return expanded, [(moved(a), moved(b)) for a, b in spans], block_spans


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor | None]:
    """A right-padded batch: input_ids, attention_mask, labels [B, T]; pixel_values [B, I, 3, M, M] and
    pixel_attention_mask [B, I, M, M] padded with all-zero frames (None when no example has images)."""
    b, t = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.int64)
    labels = torch.full((b, t), IGNORE, dtype=torch.int64)
    attention_mask = torch.zeros((b, t), dtype=torch.int64)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = e.input_ids, e.labels, 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "pixel_values": None, "pixel_attention_mask": None}
    framed = [e for e in examples if e.pixel_values is not None]
    if framed:
        i = max(e.pixel_values.shape[0] for e in framed)
        m = framed[0].pixel_values.shape[-1]
        pixel_values = torch.zeros((b, i, 3, m, m), dtype=torch.float32)
        pixel_attention_mask = torch.zeros((b, i, m, m), dtype=torch.int64)
        for row, e in enumerate(examples):
            if e.pixel_values is not None:
                n = e.pixel_values.shape[0]
                pixel_values[row, :n], pixel_attention_mask[row, :n] = e.pixel_values, e.pixel_attention_mask
        batch.update(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The record order of one epoch: a permutation that depends only on (seed, epoch), so a resumed run replays it."""
    return np.random.default_rng((seed, epoch)).permutation(n)


def micro_batch(n: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Record indices of micro-batch `index` of the endless stream epoch 0, epoch 1, ... (the last batch of an epoch
    may be smaller)."""
    per_epoch = -(-n // batch_size)
    epoch, k = divmod(index, per_epoch)
    return epoch_order(n, seed, epoch)[k * batch_size : (k + 1) * batch_size].tolist()
