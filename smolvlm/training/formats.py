"""The data formats people fine-tune on, read into the same checked records as our JSONL (see `data`):

- messages: our JSONL, one {"messages": [...]} chat conversation per line;
- sharegpt: ShareGPT / LLaVA, one {"conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
  {"from": "gpt", "value": "A cat."}], "image": "cat.png"} per line or all in one JSON array; `<image>` marks where
  each image goes (no marker: the images open the first human turn, as LLaVA does); "image" is a path (relative to the
  file) or "images" a list of them;
- datasets: a Hugging Face `datasets` dataset saved with `save_to_disk` (a folder) or a Parquet file, with an image
  column ("images": a list, or "image") and a "messages" column in the chat format (image blocks without a source take
  the row's images in order, as TRL's VLM examples store them) or a ShareGPT "conversations" column. Rows are read
  from the memory-mapped Arrow table when their micro-batch is built, so a dataset larger than memory streams; a bad
  row is found then (and skipped with --skip-bad-records).

`--data-format auto` picks the format from the path and the first record, and says which it picked.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..processing import Processor
from .data import BadRecord, Record, check_record, json_records, messages_of, read_jsonl
from .extras import need

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_COLUMNS = ("images", "image")


def read_data(path: str, data_format: str, processor: Processor,
              skip_bad_records: bool) -> tuple[Sequence[Record], list[BadRecord]]:
    """(records, skipped) of a data file or dataset folder in `data_format` (or the detected one)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"Data file {p} not found")
    chosen = detect(p) if data_format == "auto" else data_format
    if data_format == "auto":
        print(f"smolvlm finetune: reading {p} as {chosen} data (detected; --data-format to choose)", file=sys.stderr)
    if chosen == "datasets":
        return DatasetRecords(p, processor), []
    if p.is_dir():
        raise InputError(f"{p} is a folder; --data-format {chosen} reads a file (a saved `datasets` folder is "
                         "--data-format datasets)")
    return read_jsonl(p, processor, skip_bad_records, messages_of if chosen == "messages" else sharegpt_record)


def detect(path: Path) -> str:
    if path.is_dir() or path.suffix == ".parquet":
        return "datasets"
    for where, data in json_records(path):
        if isinstance(data, dict) and "messages" in data:
            return "messages"
        if isinstance(data, dict) and "conversations" in data:
            return "sharegpt"
        raise InputError(f"{where}: can't tell the data format from the first record (expected \"messages\" or "
                         f"ShareGPT's \"conversations\"); pass --data-format, got {str(data)[:120]!r}")
    raise InputError(f"{path} holds no records")


def sharegpt_record(data, where: str) -> list[dict]:
    """A ShareGPT/LLaVA record's chat messages (image paths as `path` blocks)."""
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise BadRecord(f'{where}: expected a ShareGPT object {{"conversations": [...], "image": ...}}, got '
                        f"{json.dumps(data)[:120]!r}")
    images = data.get("images", data.get("image"))
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRecord(f'{where}: "image" must be a path, or "images" a list of paths')
    return sharegpt_messages(data["conversations"], [{"type": "image", "path": i} for i in images], where)


def sharegpt_messages(turns: list, images: list[dict], where: str) -> list[dict]:
    """Chat messages of ShareGPT turns, the i-th `<image>` marker replaced by the image block images[i]."""
    marked = sum(t.get("value", "").count("<image>") for t in turns if isinstance(t, dict) and
                 isinstance(t.get("value"), str))
    if marked and marked != len(images):
        raise BadRecord(f"{where}: the conversation holds {marked} <image> markers for {len(images)} images")
    messages, pending = [], [] if marked else list(images)
    it = iter(images)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise BadRecord(f'{where}: conversations[{i}]: expected {{"from": "human" | "gpt" | "system", '
                            f'"value": text}}, got {str(turn)[:120]!r}')
        role = ROLES[turn["from"]]
        content = pending if role == "user" else []
        if role == "user":
            pending = []
        for k, piece in enumerate(turn["value"].split("<image>")):
            if k:
                content.append(next(it))
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": content})
    return messages


class DatasetRecords(Sequence):
    """The rows of a `datasets` dataset (saved folder or Parquet file) as Records, converted when read."""

    def __init__(self, path: Path, processor: Processor):
        datasets = need("datasets", "reading a Hugging Face `datasets` dataset")
        try:
            if path.is_dir():
                table = datasets.load_from_disk(str(path))
            else:
                table = datasets.Dataset.from_parquet(str(path))
        except Exception as e:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid... for a bad folder/file
            raise InputError(f"{path}: can't read it as a `datasets` dataset or Parquet file ({e})") from e
        if isinstance(table, datasets.DatasetDict):
            if "train" not in table:
                raise InputError(f"{path} holds the splits {', '.join(table)}; point --data at one split's folder")
            table = table["train"]
        columns = set(table.column_names)
        self.text = next((c for c in ("messages", "conversations") if c in columns), None)
        if self.text is None:
            raise InputError(f"{path}: expected a 'messages' (chat format) or 'conversations' (ShareGPT) column, "
                             f"found {', '.join(sorted(columns))}")
        self.image = next((c for c in IMAGE_COLUMNS if c in columns), None)
        self.table, self.path, self.processor = table, path, processor
        if len(table) == 0:
            raise InputError(f"{path} holds no rows")

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> Record:
        where = f"{self.path}, row {i}"
        row = self.table[int(i)]
        images = row.get(self.image) if self.image else None
        images = [] if images is None else images if isinstance(images, list) else [images]
        blocks = [{"type": "image", "image": _image(im, where)} for im in images]
        if self.text == "conversations":
            messages = sharegpt_messages(row["conversations"], blocks, where)
        else:
            messages = _fill_images(row["messages"], blocks, where)
        return check_record(messages, where, self.path.parent, self.processor)


def _image(value, where: str):
    """A datasets image cell: a PIL image (the Image feature), {"bytes", "path"} (undecoded) or a path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise BadRecord(f"{where}: an image cell is empty")
    return value


def _fill_images(messages, images: list[dict], where: str):
    """TRL's layout: image blocks without a source ({"type": "image"}; Arrow adds null keys) take the row's images."""
    if not isinstance(messages, list):
        raise BadRecord(f"{where}: 'messages' must be a list of messages")
    it = iter(images)
    out = []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            content = []
            for block in message["content"]:
                block = {k: v for k, v in block.items() if v is not None} if isinstance(block, dict) else block
                if isinstance(block, dict) and block.get("type") == "image" and len(block) == 1:
                    block = next(it, None)
                    if block is None:
                        raise BadRecord(f"{where}: more image blocks than the {len(images)} images of the row")
                content.append(block)
            message = {**message, "content": content}
        out.append(message)
    return out
