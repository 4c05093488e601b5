"""Incremental detokenization of one request's output, with stop strings.

Text is released piece by piece as tokens arrive. A piece never ends inside a multi-byte character (tokenizers'
DecodeStream waits for the bytes that complete it), and text that could be the start of a stop string is held back
until it is known not to be one. The pieces of a finished request concatenate to exactly its answer:
`tokenizer.decode(token_ids, skip_special_tokens=True)`, cut before the first stop string.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.stream = DecodeStream(skip_special_tokens=True)
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far (after a stop: cut before it)
        self.sent = 0  # characters of `text` already released
        self.stopped = False  # a stop string was found

    def add(self, token_id: int) -> str:
        """Take the next token; return the text that can be released now (maybe "")."""
        self.token_ids.append(token_id)
        if self.stopped:
            return ""
        piece = self.stream.step(self.tokenizer, token_id)
        return self._extend(piece) if piece else ""

    def finish(self) -> str:
        """The request ended: release everything left, including a final incomplete character as U+FFFD."""
        piece = ""
        if not self.stopped:
            full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            piece = self._extend(full[len(self.text) :])  # the stream's text is always a prefix of the full decode
        rest, self.sent = self.text[self.sent :], len(self.text)
        return piece + rest

    def _extend(self, piece: str) -> str:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            end = len(self.text)
        else:
            end = len(self.text) - self._partial_stop()
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece

    def _partial_stop(self) -> int:
        """Length of the longest end of `text` that is the beginning of a stop string (held back)."""
        return max(
            (n for s in self.stop for n in range(min(len(s) - 1, len(self.text)), 0, -1) if self.text.endswith(s[:n])),
            default=0,
        )
