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
        self.stops = StopMatcher(stop)
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
        base = len(self.text)
        self.text += piece
        cut = self.stops.feed(piece)
        if cut is not None:
            self.text, self.stopped = self.text[: base + cut], True
            end = len(self.text)
        else:
            end = len(self.text) - self.stops.held
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece


class StopMatcher:
    """Finds stop strings in text fed piece by piece, in O(piece x stop strings) amortized per piece (Knuth-Morris-
    Pratt automata): no step re-reads earlier text, whatever the stop strings' length.

    `state[k]` is the length of the longest prefix of stop string k that the text fed so far ends with."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.fail = [_failure(s) for s in stop]
        self.state = [0] * len(stop)

    @property
    def held(self) -> int:
        """Characters at the end of the text that may be the start of a stop string (not released yet)."""
        return max(self.state, default=0)

    def feed(self, piece: str) -> int | None:
        """Take more text; return where in `piece` the answer ends if a stop string completed in it, else None.
        When several complete at the same character, the longest (the one starting first) cuts."""
        for i, c in enumerate(piece):
            done = None
            for k, s in enumerate(self.stop):
                n, fail = self.state[k], self.fail[k]
                if n == len(s):  # a whole match is never kept: continue from its longest proper border
                    n = fail[n - 1]
                while n and s[n] != c:
                    n = fail[n - 1]
                n += s[n] == c
                self.state[k] = n
                if n == len(s):
                    done = max(done or 0, n)
            if done is not None:
                return i + 1 - done
        return None


def _failure(s: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, n = [0] * len(s), 0
    for i in range(1, len(s)):
        while n and s[i] != s[n]:
            n = fail[n - 1]
        n += s[i] == s[n]
        fail[i] = n
    return fail
