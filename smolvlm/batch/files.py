"""Batch inputs and outputs: OpenAI Batch JSONL in and out, the short form (images + one prompt), Parquet out.

Input lines are OpenAI Batch requests, `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions",
"body": {chat completion request}}`, read one at a time (a file of any length streams in constant memory). The short
form makes the same requests from a list of image/video files and one prompt, with the file's path as custom_id.

Output lines are OpenAI Batch results, `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`: the body is the chat.completion the server would answer, or for a failed request the server's error body
(status 400); `error` is null on success and `{"code", "message", "param", "line"}` (openai.types.BatchError) on
failure, so `error != null` selects the failures. A line that can't be read as a request at all (not JSON, no
custom_id) is reported with custom_id null and its line number.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..serving.protocol import APIError

CHAT_URL = "/v1/chat/completions"
VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".gif"}
MEDIA_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"} | VIDEO_SUFFIXES


@dataclass
class Item:
    """One input request: its body (JSON bytes, validated later in a worker) or why the line is unusable."""

    key: str  # unique per input: the custom_id, or "line:N" for a line without one
    custom_id: str | None
    line: int  # 1-based line of the input file (or position in the list of files)
    body: bytes | None = None
    error: APIError | None = None


def key_of(custom_id: str | None, line: int | None) -> str:
    return custom_id if custom_id is not None else f"line:{line}"


def read_requests(path: str | os.PathLike) -> Iterator[Item]:
    """The requests of an OpenAI Batch JSONL file, one line at a time (blank lines are skipped)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"Can't read the batch input {os.fspath(path)!r}: {e.strerror or e}") from None
    with f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield parse_line(raw, n)


def parse_line(raw: bytes, n: int) -> Item:
    """One OpenAI Batch input line as an Item (with its error if it isn't a usable request line)."""
    def bad(message: str, param: str | None = None, custom_id: str | None = None) -> Item:
        error = APIError(f"line {n}: {message}", 400, param, "invalid_batch_line")
        return Item(key_of(custom_id, n), custom_id, n, error=error)

    try:
        line = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return bad(f"not valid JSON ({e})")
    if not isinstance(line, dict):
        return bad(f"expected a JSON object, got a JSON {type(line).__name__}")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad(f"custom_id must be a non-empty string, got {custom_id!r:.60}", "custom_id")
    if line.get("method", "POST") != "POST":
        return bad(f"method must be 'POST', got {line.get('method')!r:.60}", "method", custom_id)
    if line.get("url", CHAT_URL) != CHAT_URL:
        return bad(f"url must be {CHAT_URL!r}, got {line.get('url')!r:.60}", "url", custom_id)
    if not isinstance(line.get("body"), dict):
        return bad("body must be a JSON object (a chat completion request)", "body", custom_id)
    return Item(custom_id, custom_id, n, body=json.dumps(line["body"]).encode())


def media_files(patterns: list[str]) -> Iterator[str]:
    """Files named by each pattern, in order: a folder (its image/video files, recursively, sorted), a glob
    (`photos/**/*.jpg`), a `.txt` list of paths (one a line), or a file path (kept even if missing: the job reports
    it as that item's error)."""
    for pattern in patterns:
        if os.path.isdir(pattern):
            for root, dirs, files in os.walk(pattern):
                dirs.sort()
                yield from (os.path.join(root, f) for f in sorted(files) if Path(f).suffix.lower() in MEDIA_SUFFIXES)
        elif glob.has_magic(pattern):
            yield from sorted(glob.iglob(pattern, recursive=True))
        elif pattern.endswith(".txt"):
            try:
                with open(pattern, encoding="utf-8") as f:
                    yield from (line.strip() for line in f if line.strip())
            except OSError as e:
                raise InputError(f"Can't read the list of files {pattern!r}: {e.strerror or e}") from None
        else:
            yield pattern


def media_requests(patterns: list[str], prompt: str, fields: dict) -> Iterator[Item]:
    """One request per file: the file (as a file: URL) then the prompt, with `fields` (max_tokens...) in the body."""
    for n, path in enumerate(media_files(patterns), 1):
        kind = "video_url" if Path(path).suffix.lower() in VIDEO_SUFFIXES else "image_url"
        content = [{"type": kind, kind: {"url": Path(path).absolute().as_uri()}}, {"type": "text", "text": prompt}]
        body = {"messages": [{"role": "user", "content": content}], **fields}
        yield Item(path, path, n, body=json.dumps(body).encode())


def count_lines(path: str | os.PathLike) -> int:
    """Non-blank lines of a file, for the progress bar's total (read in blocks: constant memory)."""
    count = 0
    with open(path, "rb") as f:
        for raw in f:
            count += bool(raw.strip())
    return count


def success_line(custom_id: str, completion: dict) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": completion["id"], "body": completion}, "error": None}


def error_line(custom_id: str | None, line: int, error: APIError) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": error.status, "request_id": f"req_{uuid.uuid4().hex}", "body": error.body()},
            "error": {"code": error.code or error.type, "message": error.message, "param": error.param, "line": line}}


def line_key(record: dict) -> str:
    """The input a result line answers (its custom_id, or "line:N")."""
    return key_of(record.get("custom_id"), (record.get("error") or {}).get("line"))


PARQUET_COLUMNS = ("custom_id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "status_code", "error")


def flat(record: dict) -> dict:
    """A result line as flat columns (Parquet): custom_id, text, finish_reason, token counts, status_code, error."""
    body, error = record["response"]["body"], record.get("error")
    choice = body.get("choices", [{}])[0] if error is None else {}
    message = choice.get("message") or {}
    text = message.get("content")
    if message.get("tool_calls"):
        text = json.dumps(message["tool_calls"])
    usage = body.get("usage") or {}
    return {"custom_id": record.get("custom_id"), "text": text, "finish_reason": choice.get("finish_reason"),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "status_code": record["response"]["status_code"], "error": None if error is None else error["message"]}


def write_parquet(records: Iterator[dict], path: str | os.PathLike, rows_per_group: int = 10_000) -> int:
    """Write result lines as a Parquet file of `flat` rows (in row groups: constant memory); returns the rows."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet output needs pyarrow: pip install 'smolvlm[parquet]' (or write .jsonl)") from None
    schema = pa.schema([("custom_id", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()),
                        ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                        ("status_code", pa.int64()), ("error", pa.string())])
    rows, total = [], 0
    tmp = f"{os.fspath(path)}.tmp"
    with pq.ParquetWriter(tmp, schema) as writer:
        for record in records:
            rows.append(flat(record))
            if len(rows) == rows_per_group:
                writer.write_table(pa.Table.from_pylist(rows, schema))
                total, rows = total + len(rows), []
        if rows or not total:
            writer.write_table(pa.Table.from_pylist(rows, schema))
            total += len(rows)
    os.replace(tmp, path)  # readers never see a half-written file
    return total
