"""Ray Data: `SmolVLMPredictor`, a callable class for `Dataset.map_batches` that loads one engine per actor, and
`smolvlm run-batch --ray`, which reads and writes through Ray Data (local files, or any path Ray Data reads: s3://,
gs://, abfs://...). Needs `pip install "smolvlm[ray]"`.

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    ds = ds.map_batches(SmolVLMPredictor, fn_constructor_kwargs=dict(model="HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
                        prompt="Describe this image."), concurrency=4, num_gpus=1, batch_size=64)
    ds.write_parquet("s3://bucket/captions/")

Each row is answered the way `smolvlm run-batch` answers a line (runner.py: the server's validation and limits), so
the same inputs give the same answers on one machine or many. Inside an actor a thread prepares the rows of a batch
(decoding and resizing images) ahead of the engine, which batches them continuously.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import InputError
from ..serving.limits import Limits
from .cli import MAX_EXIT
from .files import PARQUET_COLUMNS, VIDEO_SUFFIXES, Item, flat, parse_line, media_files

ROWS_PER_CALL = 4  # x max_batch: rows an actor is handed at once (its slots drain only at the end of a call)


class SmolVLMPredictor:
    """Answers rows of a Ray Dataset. A row is one of:
    - `request`: an OpenAI Batch input line (JSON text, as `ray.data.read_text` gives);
    - `body` (an OpenAI chat-completion body, dict or JSON text) or `messages` (OpenAI messages), with `custom_id`;
    - `bytes` (an encoded image, as `read_binary_files` gives) or `path` (a file this actor can read), with `prompt`
      (or the constructor's prompt); custom_id defaults to `path`, else the row's position.
    Output rows: custom_id, text, finish_reason, prompt_tokens, completion_tokens, status_code, error (null when it
    succeeded), and `response`, the row's OpenAI Batch output line as JSON text."""

    def __init__(self, model: str, prompt: str | None = None, fields: dict | None = None, dtype: str | None = None,
                 device: str | None = None, quantize: str | None = None, adapter: str | None = None,
                 revision: str | None = None, max_batch: int = 16,
                 max_model_len: int = 2048, limits: Limits | None = None, options: dict | None = None,
                 model_name: str | None = None):
        from ..api import load
        from .runner import Answers, Preparer, batch_engine

        self.vlm = load(model, dtype=dtype, device=device, revision=revision, quantize=quantize, adapter=adapter,
                        progress=False)
        engine = batch_engine(self.vlm, max_batch, max_model_len)
        self.answers = Answers(engine, model_name or str(model))
        limits = limits or Limits(allow_file_urls=True)
        self.preparer = Preparer(self.vlm.processor, limits, engine.max_len, options)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="smolvlm-prepare")  # Pillow and tokenizers free the GIL
        self.prompt, self.fields, self.window = prompt, fields or {}, 2 * max_batch

    def __call__(self, batch: dict) -> dict:
        from .runner import answer_stream

        n = len(next(iter(batch.values()))) if batch else 0
        items = [self._item({k: v[i] for k, v in batch.items()}, i) for i in range(n)]
        lines = {}
        for finished in answer_stream(self.answers, iter(items), lambda item: self.pool.submit(self.preparer, item),
                                      self.window):
            lines.update((item.key, record) for item, record in finished)
        rows = [{**flat(lines[item.key]), "response": json.dumps(lines[item.key], ensure_ascii=False)}
                for item in items]
        return {column: [row[column] for row in rows] for column in (*PARQUET_COLUMNS, "response")}

    def _item(self, row: dict, i: int) -> Item:
        key = str(i)  # unique within the call; custom_ids need not be
        if row.get("request") is not None:
            item = parse_line(_text(row["request"]).encode(), i + 1)
            return Item(key, item.custom_id, item.line, item.body, item.error)
        custom_id = row.get("custom_id") or (str(row["path"]) if row.get("path") is not None else str(i))
        body = row.get("body")
        if body is None and row.get("messages") is not None:
            messages = row["messages"]
            body = {"messages": json.loads(messages) if isinstance(messages, str) else _plain(messages)}
        if body is None:
            body = self._media_body(row)
        if isinstance(body, (str, bytes)):
            return Item(key, custom_id, i + 1, body=body.encode() if isinstance(body, str) else body)
        return Item(key, custom_id, i + 1, body=json.dumps({**self.fields, **_plain(body)}).encode())

    def _media_body(self, row: dict) -> dict:
        prompt = row.get("prompt") or self.prompt
        if not prompt:
            raise InputError("A row with an image needs a 'prompt' column, or SmolVLMPredictor(prompt=...)")
        path = row.get("path")
        video = path is not None and Path(str(path)).suffix.lower() in VIDEO_SUFFIXES
        kind = "video_url" if video else "image_url"
        if row.get("bytes") is not None:
            url = f"data:application/octet-stream;base64,{base64.b64encode(bytes(row['bytes'])).decode()}"
        elif path is not None:
            url = Path(str(path)).absolute().as_uri()
        else:
            raise InputError("A row needs one of the columns request, body, messages, bytes or path")
        content = [{"type": kind, kind: {"url": url}}, {"type": "text", "text": prompt}]
        return {"messages": [{"role": "user", "content": content}], **self.fields}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value):
    """Arrow/numpy values of a row (arrays, numpy scalars) as plain JSON-able Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_on_ray(args, fields: dict, limits: Limits, options: dict, model_name: str) -> int:
    """`smolvlm run-batch --ray`: read, answer (args.concurrency actors) and write through Ray Data."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray Data: pip install 'smolvlm[ray]'") from None
    ray.init(address=args.ray or None, log_to_driver=False)  # no address: RAY_ADDRESS, a running cluster, or a new one
    if args.input is not None:
        ds = ray.data.read_text(args.input).map(lambda row: {"request": row["text"]})
    else:
        paths = [path for pattern in args.images for path in _expand(pattern)]
        ds = ray.data.read_binary_files(paths, include_paths=True)
    constructor = dict(model=args.model, prompt=args.prompt, fields=fields, dtype=args.dtype, device=args.device,
                       quantize=args.quantize, adapter=args.adapter, revision=args.revision, max_batch=args.max_batch,
                       max_model_len=args.max_model_len, limits=limits, options=options, model_name=model_name)
    ds = ds.map_batches(SmolVLMPredictor, fn_constructor_kwargs=constructor, concurrency=args.concurrency,
                        num_gpus=args.num_gpus or None, batch_size=ROWS_PER_CALL * args.max_batch,
                        batch_format="numpy").materialize()
    (ds.write_parquet if args.output.endswith(".parquet") else ds.write_json)(args.output)
    total, failed = ds.count(), ds.filter(lambda row: row["error"] is not None).count()
    print(f"{args.output}: {total} results, {failed} failed", file=sys.stderr)
    return min(failed, MAX_EXIT)


def _expand(pattern: str) -> list[str]:
    """Local patterns as absolute file paths (media_files); remote paths (scheme://) as given, for Ray Data."""
    return [pattern] if "://" in pattern else [os.path.abspath(p) for p in media_files([pattern])]
