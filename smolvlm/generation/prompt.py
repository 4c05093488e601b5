"""A request's model inputs: the chat-templated, tokenized conversation and its image frames (`Prompt`), and the
ids that end an answer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

END_OF_UTTERANCE = "<end_of_utterance>"


@dataclass
class Prompt:
    """Model inputs of one conversation: input_ids [T], and its image frames [I, 3, H, W] / [I, H, W] if any, with
    their content keys when the processor's image cache gave them (else the engine hashes the frames)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    pixel_attention_mask: torch.Tensor | None = None
    frame_keys: list[bytes] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def prepare(processor, messages, **options) -> Prompt:
    """Chat-template and tokenize one conversation, loading and splitting its images. `options` go to the processor
    (per-call settings such as fps, max_frames, do_image_splitting, and image_cache: `Caches.images`, so a picture
    sent again is neither tiled nor hashed again)."""
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **options)
    pixel_values = inputs.get("pixel_values")
    return Prompt(
        inputs["input_ids"][0],
        None if pixel_values is None else pixel_values[0],
        None if pixel_values is None else inputs["pixel_attention_mask"][0],
        inputs["frame_keys"][0] if "frame_keys" in inputs else None,
    )


def prepare_all(processor, conversations: list, **options) -> list[Prompt]:
    """`prepare` for each conversation; Prompts pass through. One at a time: preparing in threads (Pillow releases
    the GIL) took 8 one-tile conversations from 0.76 to 0.41 s on 2 cores, but the threads' malloc arenas kept
    45-85 MB more at the peak of a batch, level with the reference's peak."""
    return [item if isinstance(item, Prompt) else prepare(processor, item, **options) for item in conversations]


def end_token_ids(folder: str | Path, tokenizer) -> list[int]:
    """The ids that end an answer: generation_config.json's eos_token_id (int or list) plus <end_of_utterance>."""
    ids = [tokenizer.token_to_id(END_OF_UTTERANCE)]
    path = Path(folder) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{path}: not a valid JSON object ({e})") from e
        eos = eos if isinstance(eos, list) else [eos]
        if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in eos):
            raise ConfigError(f"{path}: field 'eos_token_id' = {eos!r}: expected an integer or a list of integers")
        ids += eos
    return sorted({i for i in ids if i is not None})
