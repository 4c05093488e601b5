"""Structured output: answers constrained to a JSON schema, a regex or a list of choices (constrained decoding).

A `Grammar` says what the answer must be. `Grammars` (one per tokenizer and set of end tokens) compiles it with
llguidance against the tokenizer's vocabulary, caching the compiled grammar, and hands each request its own
`Matcher`. Each step, before sampling, `Grammars.mask` asks the matchers of the constrained rows which tokens may
come next (a bitmask over the vocabulary, filled on the CPU, in parallel over rows) and sets the logits of every
other token to -inf; unconstrained rows are left untouched. Once a row's token is sampled, `Matcher.advance` moves
its parser on; the answer ends (finish_reason "stop") when the grammar is complete and can't go on, or when the model
picks an end token where the grammar allows the answer to end.

JSON is generated compact (", " and ": " between items, no other whitespace): a model may not pad an answer with
whitespace forever. Schema keywords llguidance does not implement are refused rather than ignored, so an answer
that completes always validates against its schema.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import InputError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled grammars kept per tokenizer (a server sees the same few schemas again and again)


@dataclass(frozen=True)
class Grammar:
    """What an answer must be: `kind` "json_schema" (source: the schema as JSON text), "json_object" (any JSON
    object), "regex" (source: the pattern, matched against the whole answer) or "choice" (source: a JSON list of
    the allowed answers). Build one with the class methods; they check the shape of their argument."""

    kind: str
    source: str = ""

    @classmethod
    def json_schema(cls, schema) -> Grammar:
        """From a JSON schema: a dict, its JSON text, or a pydantic model class."""
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InputError(f"The JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise InputError(f"A JSON schema must be a JSON object (a dict); got {type(schema).__name__}")
        try:
            return cls("json_schema", json.dumps(schema))  # key order kept: properties come in schema order
        except (TypeError, ValueError) as e:
            raise InputError(f"The JSON schema can't be written as JSON: {e}") from None

    @classmethod
    def json_object(cls) -> Grammar:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern) -> Grammar:
        if not isinstance(pattern, str) or not pattern:
            raise InputError(f"A regex constraint must be a non-empty string; got {pattern!r:.100}")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices) -> Grammar:
        if (isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise InputError(f"choices must be a non-empty list of non-empty strings; got {choices!r:.200}")
        return cls("choice", json.dumps(list(choices)))

    @property
    def schema(self) -> dict | None:
        """The JSON schema of a json_schema grammar (None for other kinds)."""
        return json.loads(self.source) if self.kind == "json_schema" else None

    def llguidance(self) -> str:
        """The grammar in llguidance's format (raises ValueError for a schema that is not a JSON object)."""
        llguidance = _llguidance()
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            # Lark string literals take JSON's escapes, so json.dumps quotes any choice exactly.
            choices = " | ".join(map(json.dumps, json.loads(self.source)))
            return llguidance.LLMatcher.grammar_from_lark(f"start: {choices}")
        raise InputError(f"Unknown grammar kind {self.kind!r}: expected json_schema, json_object, regex or choice")

    def describe(self) -> str:
        return {"json_schema": "JSON schema", "json_object": "JSON object", "regex": "regex",
                "choice": "choices"}.get(self.kind, self.kind)


class Matcher:
    """One request's parser state: which tokens may come next, advanced by each sampled token."""

    def __init__(self, matcher):
        self.matcher = matcher  # an llguidance.LLMatcher of its own

    def advance(self, token: int) -> bool:
        """Consume the sampled token; True once the grammar is complete and allows nothing more."""
        self.matcher.consume_token(token)  # the mask allowed it, so this can't fail
        return self.matcher.is_stopped()


class Grammars:
    """Compiles grammars for one tokenizer (cached) and masks the logits of constrained rows."""

    def __init__(self, tokenizer_json: str, end_ids: tuple[int, ...]):
        llguidance = _llguidance()
        # The end tokens are the grammar's EOS: allowed wherever the answer may end.
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, eos_token=list(end_ids))
        self.vocab = self.tokenizer.vocab_size
        self.words = (self.vocab + 31) // 32  # int32 words of one row's bitmask
        self.executor = llguidance.LLExecutor()
        self.compiled: OrderedDict[Grammar, object] = OrderedDict()  # LRU: grammar -> its initial LLMatcher
        self.lock = threading.Lock()  # server threads compile while the engine loop makes matchers
        self.shifts = torch.arange(32, dtype=torch.int32)

    def compile(self, grammar: Grammar):
        """The compiled grammar (an LLMatcher in its initial state), from the cache if it was compiled before.
        Raises InputError naming the problem for a grammar llguidance can't compile."""
        llguidance = _llguidance()
        with self.lock:
            if grammar in self.compiled:
                self.compiled.move_to_end(grammar)
                return self.compiled[grammar]
        try:
            source = grammar.llguidance()
        except ValueError as e:
            raise InputError(f"Can't compile the {grammar.describe()}: {e}") from None
        matcher = llguidance.LLMatcher(self.tokenizer, source, log_level=0)
        if matcher.is_error():
            raise InputError(f"Can't compile the {grammar.describe()}: {matcher.get_error()}")
        with self.lock:
            self.compiled[grammar] = matcher
            while len(self.compiled) > CACHE_SIZE:
                self.compiled.popitem(last=False)
        return matcher

    def matcher(self, grammar: Grammar) -> Matcher:
        """A fresh parser for one request (a copy of the compiled grammar)."""
        return Matcher(self.compile(grammar).deep_copy())

    def mask(self, logits: torch.Tensor, matchers: list[Matcher | None]) -> torch.Tensor:
        """logits [n, V] of rows whose matchers are `matchers` (None: unconstrained) -> the logits with every token
        a constrained row's grammar forbids at -inf; unconstrained rows unchanged. V may differ from the tokenizer's
        vocabulary: lm_head rows past it are forbidden too."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return logits
        bitmask = torch.empty(len(rows), self.words, dtype=torch.int32)  # [c, W], bit j of word w: token 32w + j
        self.executor.unsafe_compute_mask_ptr(
            [(matchers[i].matcher, k) for k, i in enumerate(rows)], bitmask.data_ptr(), self.words * 4, len(rows)
        )
        allowed = ((bitmask[:, :, None] >> self.shifts) & 1).view(len(rows), -1).bool()  # [c, 32 W]
        v = logits.shape[-1]
        if allowed.shape[1] < v:  # lm_head rows past the tokenizer's vocabulary: never allowed
            allowed = torch.nn.functional.pad(allowed, (0, v - allowed.shape[1]))
        index = torch.tensor(rows, device=logits.device)
        masked = logits[index].masked_fill(~allowed[:, :v].to(logits.device), -torch.inf)
        return logits.index_copy(0, index, masked)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise InputError("Structured output (json_schema, regex, choices) needs llguidance: "
                         "pip install 'smolvlm[structured]'") from None
    return llguidance


_shared: dict[tuple[int, tuple[int, ...]], tuple[object, Grammars]] = {}  # (id(tokenizer), end ids) -> it
_shared_lock = threading.Lock()


def grammars_for(tokenizer, end_ids) -> Grammars:
    """The shared `Grammars` of a tokenizers.Tokenizer and its end tokens (building one takes ~0.3 s, so the
    engine, the server's request checks and every engine a SmolVLM object makes share one)."""
    key = (id(tokenizer), tuple(sorted(end_ids)))
    with _shared_lock:
        if key not in _shared:  # the entry keeps the tokenizer alive, so its id is not reused
            _shared[key] = tokenizer, Grammars(tokenizer.to_str(), key[1])
        return _shared[key][1]
