"""The output file as a journal: append-only JSONL, so a job killed at any moment resumes where it stopped.

Each finished item is appended as one complete line (one `write` of the whole line, then `fsync`), so the file holds
whole lines plus, at worst, a torn last one from a kill mid-write. Opening the journal truncates that torn tail and
reads the keys already answered; the job then skips them. An item in flight when the job died has no line yet and is
run again, so every input ends up in the file exactly once.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator

from ..errors import InputError
from .files import line_key


class Journal:
    """Append-only result lines at `path` (created if missing). `done` holds the keys already written, `failed` the
    number of those that are errors."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.done: set[str] = set()
        self.failed = 0
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:  # one job per output file (the lock goes with the process, a killed one included)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise InputError(f"{self.path}: another job is writing this output file") from None
        end = self._recover()
        os.ftruncate(self.fd, end)  # drop a torn last line (a kill mid-write)

    def _recover(self) -> int:
        """Read the complete lines; return the byte offset where they end."""
        end = 0
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # torn: the job died while writing it
                try:
                    record = json.loads(raw)
                    key, failed = line_key(record), record.get("error") is not None
                except (ValueError, AttributeError, TypeError):
                    raise InputError(f"{self.path}: line {n} is not a result line this job wrote; the output file "
                                     "must be a previous run's output (to resume) or a new file") from None
                self.done.add(key)
                self.failed += failed
                end += len(raw)
        return end

    def write(self, records: list[dict]) -> None:
        """Append the lines of finished items (one write, then fsync: they survive a crash of the machine too)."""
        if not records:
            return
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)
        for r in records:
            self.done.add(line_key(r))
            self.failed += r.get("error") is not None

    def records(self) -> Iterator[dict]:
        with open(self.path, "rb") as f:
            for raw in f:
                yield json.loads(raw)

    def close(self) -> None:
        os.close(self.fd)
