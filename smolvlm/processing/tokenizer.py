"""The checkpoint's tokenizer (tokenizer.json through the `tokenizers` library) and the settings around it
(tokenizer_config.json, special_tokens_map.json), plus batch encoding with the reference's padding and truncation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..errors import CheckpointError, ConfigError, InputError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")  # the reference's template variables
LARGE_MAX_LENGTH = int(1e20)  # transformers' "no model_max_length" sentinel


def read_json(folder: Path, name: str, required: bool = True) -> dict | None:
    """A checkpoint JSON file as a dict; CheckpointError if required and missing, ConfigError if not valid JSON."""
    path = folder / name
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing: a SmolVLM checkpoint folder needs {name}")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer_config.json / special_tokens_map.json say around tokenizer.json."""

    special_tokens: dict = field(default_factory=dict)  # bos_token, eos_token, unk_token, pad_token -> string
    pad_token_id: int | None = None
    padding_side: str = "right"
    truncation_side: str = "right"
    model_max_length: int | None = None  # None: no limit
    config: dict = field(default_factory=dict, repr=False)  # tokenizer_config.json as read (extra token names)


def load_tokenizer(folder: Path) -> tuple[Tokenizer, TokenizerSettings]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the processor needs the checkpoint's tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exception on a malformed file
        raise ConfigError(f"{path}: not a valid tokenizers file ({e})") from e
    config = read_json(folder, "tokenizer_config.json", required=False) or {}
    special_map = read_json(folder, "special_tokens_map.json", required=False) or {}
    special = {}
    for key in SPECIAL_TOKEN_KEYS:  # tokenizer_config.json wins over special_tokens_map.json, as in the reference
        value = config.get(key, special_map.get(key))
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: field {key!r} = {value!r}: expected a token string")
        if value is not None:
            special[key] = value
    pad_token_id = None
    if "pad_token" in special:
        pad_token_id = tokenizer.token_to_id(special["pad_token"])
        if pad_token_id is None:
            raise ConfigError(f"{folder}: pad_token {special['pad_token']!r} is not in tokenizer.json's vocabulary")
    sides = {}
    for key in ("padding_side", "truncation_side"):
        sides[key] = config.get(key, "right")
        if sides[key] not in ("left", "right"):
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: field {key!r} = {sides[key]!r}: expected "
                              "'left' or 'right'")
    max_len = config.get("model_max_length")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, (int, float)) or max_len < 1):
        raise ConfigError(f"{folder / 'tokenizer_config.json'}: field 'model_max_length' = {max_len!r}: expected a "
                          "positive integer")
    max_len = None if max_len is None or max_len >= LARGE_MAX_LENGTH else int(max_len)
    return tokenizer, TokenizerSettings(special, pad_token_id, model_max_length=max_len, config=config, **sides)


def encode(
    tokenizer: Tokenizer,
    settings: TokenizerSettings,
    texts: list[str],
    padding: bool | str = False,
    truncation: bool | str | None = None,
    max_length: int | None = None,
    padding_side: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (int64 [B, T]) with transformers' padding/truncation rules.

    padding: False / "do_not_pad" (the reference's default), True / "longest", or "max_length".
    truncation: None (on only when max_length is given without padding, as in transformers), False / True /
    "longest_first" / "only_first" / "do_not_truncate". Truncation cuts on tokenizer_config.json's truncation_side
    (SmolVLM checkpoints say "left"). A batch of unequal lengths is padded to the longest even with padding=False,
    since the result is a tensor (the reference raises there).
    """
    if padding not in (False, True, "do_not_pad", "longest", "max_length"):
        raise InputError(f"padding = {padding!r}: expected False, True, 'longest' or 'max_length'")
    if truncation not in (None, False, True, "do_not_truncate", "longest_first", "only_first"):
        raise InputError(f"truncation = {truncation!r}: expected True, False, 'longest_first' or 'do_not_truncate'")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise InputError(f"max_length = {max_length!r}: expected a positive integer")
    side = padding_side or settings.padding_side
    if side not in ("left", "right"):
        raise InputError(f"padding_side = {padding_side!r}: expected 'left' or 'right'")
    if max_length is not None and padding is False and truncation is None:
        truncation = True
    truncate = truncation not in (None, False, "do_not_truncate")
    pad_to_max = padding == "max_length"
    if max_length is None and (truncate or pad_to_max):
        max_length = settings.model_max_length
        truncate = truncate and max_length is not None
        pad_to_max = pad_to_max and max_length is not None

    ids = [encoding.ids for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=True)]
    if truncate:
        keep = (lambda row: row[-max_length:]) if settings.truncation_side == "left" else (lambda row: row[:max_length])
        ids = [keep(row) if len(row) > max_length else row for row in ids]
    lengths = [len(row) for row in ids]
    width = max(max(lengths), max_length if pad_to_max else 0)
    if any(n != width for n in lengths) and settings.pad_token_id is None:
        raise InputError("The tokenizer has no pad token (pad_token in tokenizer_config.json), so prompts of "
                         f"different lengths ({lengths} tokens) can't be batched")
    input_ids = torch.full((len(ids), width), settings.pad_token_id or 0, dtype=torch.int64)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.int64)
    for b, row in enumerate(ids):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[b, span] = torch.tensor(row, dtype=torch.int64)
        attention_mask[b, span] = 1
    return input_ids, attention_mask
