"""`Processor`: text + images -> model inputs, as the reference's Idefics3Processor (SmolVLM v1 checkpoints) and
SmolVLMProcessor (SmolVLM2) make them, plus the chat template and decoding."""

from __future__ import annotations

import os
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from ..errors import ConfigError, InputError
from ..hub import resolve
from .chat import collect_media, has_video, normalize_conversations, render
from .image_cache import process_batch
from .image_processor import ImageProcessor
from .images import load_image
from .prompt import ImageTokens, expand_images
from .tokenizer import TokenizerSettings, encode, load_tokenizer, read_json
from .video import VIDEO_CHAT_TEMPLATE, VIDEO_TOKEN, VideoSampling, expand_videos

FAMILIES = {"Idefics3Processor": "idefics3", "SmolVLMProcessor": "smolvlm"}  # processor_class -> model_type
CALL_KWARGS = ("padding", "truncation", "max_length", "padding_side", "return_tensors", "do_image_splitting", "size",
               "max_image_size", "do_resize", "fps", "max_frames", "image_cache")


class Processor:
    """Turns prompts and images into `input_ids`, `attention_mask`, `pixel_values`, `pixel_attention_mask`.

    `family` is the checkpoint's model_type: "idefics3" (v1) or "smolvlm" (v2). They differ in one thing here: with
    several prompts and a flat list of images, v1 hands each prompt as many images as it has `<image>`s, while v2
    reads a flat list as the images of a single prompt (and then reports the mismatch).
    """

    def __init__(self, tokenizer: Tokenizer, settings: TokenizerSettings, image_processor: ImageProcessor,
                 image_seq_len: int, family: str = "smolvlm", chat_template: str | dict | None = None,
                 image_tokens: ImageTokens = ImageTokens(), video_sampling: VideoSampling = VideoSampling()):
        self.tokenizer = tokenizer
        self.settings = settings
        self.image_processor = image_processor
        self.image_seq_len = image_seq_len
        self.family = family
        self.chat_template = chat_template
        self.image_tokens = image_tokens
        self.video_sampling = video_sampling  # fps, max_frames and frame size for videos (processing/video.py)
        self.image_token_id = tokenizer.token_to_id(image_tokens.image)
        if self.image_token_id is None:
            raise ConfigError(f"tokenizer.json has no token {image_tokens.image!r} (the image placeholder)")

    @property
    def pad_token_id(self) -> int | None:
        return self.settings.pad_token_id

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Processor:
        """Read a checkpoint folder (or hub repo): preprocessor_config.json, processor_config.json, the tokenizer
        files and the chat template."""
        folder = resolve(path_or_repo_id, revision)
        preprocessor = read_json(folder, "preprocessor_config.json")
        processor_config = read_json(folder, "processor_config.json")
        seq_len = processor_config.get("image_seq_len")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"{folder / 'processor_config.json'}: field 'image_seq_len' = {seq_len!r}: expected a "
                              "positive integer (the <image> tokens per tile, 64 or 81 in released checkpoints)")
        family = _family(folder, processor_config, preprocessor)
        tokenizer, settings = load_tokenizer(folder)
        image_tokens = ImageTokens()
        if family == "smolvlm":  # SmolVLMProcessor reads the token names from the tokenizer; Idefics3Processor doesn't
            names = {"image": "image_token", "fake_around": "fake_image_token", "global_image": "global_image_token"}
            image_tokens = ImageTokens(**{f: settings.config[k] for f, k in names.items()
                                          if isinstance(settings.config.get(k), str)})
        source = str(folder / "preprocessor_config.json")
        return cls(tokenizer, settings, ImageProcessor.from_dict(preprocessor, source), seq_len, family,
                   _chat_template(folder, settings.config), image_tokens,
                   VideoSampling.from_dict(preprocessor.get("video_sampling"), source))

    # -- prompts and images -> model inputs --

    def __call__(self, text: str | list[str] | None = None, images=None, *, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None, padding_side: str | None = None,
                 return_tensors: str = "pt", do_image_splitting: bool | None = None, size: dict | None = None,
                 max_image_size: dict | None = None, do_resize: bool | None = None, videos=None,
                 fps: float | None = None, max_frames: int | None = None, image_cache=None) -> dict[str, torch.Tensor]:
        """Model inputs for one prompt or a batch.

        `images`: one image, a flat list (the images of one prompt; for v1 checkpoints with several prompts, split
        over them by their `<image>` counts), or one list per prompt (empty for text-only rows). An image is any
        source `load_image` takes. Each prompt must hold one `<image>` per image. `padding_side` defaults to the
        tokenizer's ("right"); batched generation wants "left". The image settings override the checkpoint's for
        this call. `videos` (SmolVLM2 only): each `<video>` in the text is expanded; `fps` and `max_frames`
        override the checkpoint's video sampling (see processing/video.py, docs/video.md). `image_cache`: processed
        images by content (image_cache.py): a picture seen before is not resized and tiled again, the output's
        `pixel_values` may be the cached frames themselves (read only), and it adds `frame_keys`, one content key per
        real frame for each prompt.
        """
        if return_tensors != "pt":
            raise InputError(f"return_tensors = {return_tensors!r}: only 'pt' (torch tensors) is supported")
        texts = _texts(text)
        batch = self._layout(images, texts)
        if videos is None or texts is not None:  # (videos alone have no text to check)
            self._check_counts(texts, batch)
        out = {}
        if batch is not None:
            images_rgb = [[_load(source, b, j) for j, source in enumerate(sample)] for b, sample in enumerate(batch)]
            processor = self.image_processor.with_overrides(do_resize, size, max_image_size, do_image_splitting)
            if image_cache is None:
                pixels = processor(images_rgb)
                out = {}
            else:
                pixels, keys = process_batch(processor, images_rgb, image_cache)
                out = {"frame_keys": keys}
            out |= {"pixel_values": pixels.pixel_values, "pixel_attention_mask": pixels.pixel_attention_mask}
            if texts is not None:
                texts = expand_images(texts, pixels.rows, pixels.cols, self.image_seq_len, self.image_tokens)
        if videos is not None or any(VIDEO_TOKEN in t for t in texts or ()):
            if batch is not None:  # the reference's video pixel_values would overwrite the images'
                raise InputError("Pass images or videos in one call, not both")
            texts, out = expand_videos(self, texts, videos, fps, max_frames)
        if texts is None:
            return out
        input_ids, attention_mask = encode(self.tokenizer, self.settings, texts, padding, truncation, max_length,
                                           padding_side)
        kept = (input_ids == self.image_token_id).sum(dim=1).tolist()
        wanted = [t.count(self.image_tokens.image) for t in texts]
        if kept != wanted:
            raise InputError(f"Truncation to {input_ids.shape[1]} tokens would cut image tokens: the prompts hold "
                             f"{wanted} {self.image_tokens.image} tokens but only {kept} would be kept. Raise "
                             "max_length or turn truncation off.")
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

    def _layout(self, images, texts: list[str] | None) -> list[list] | None:
        """Images as one list per sample (None: no images at all)."""
        if images is None:
            return None
        if _is_image(images):
            images = [images] if getattr(images, "ndim", 3) != 4 else list(images)  # a 4-D array is a list of images
        if not isinstance(images, (list, tuple)):
            raise InputError(f"images: unsupported {type(images).__name__}; expected an image, a list of images or "
                             "a list of lists of images (one per prompt)")
        if images and all(isinstance(sample, (list, tuple)) for sample in images):
            batch = [list(sample) for sample in images]
        elif all(_is_image(x) for x in images):
            batch = [list(images)]
            if self.family == "idefics3" and texts is not None:  # Idefics3Processor: split by the prompts' counts
                ends = list(accumulate(t.count(self.image_tokens.image) for t in texts))
                batch = [images[start:end] for start, end in zip([0] + ends, ends)]
                if len(images) > ends[-1]:
                    batch.append(images[ends[-1]:])
        else:
            raise InputError("images must be an image, a list of images (one prompt) or a list of lists of images "
                             "(one list per prompt); got a list mixing images and lists or other objects")
        for b, sample in enumerate(batch):
            for j, source in enumerate(sample):
                if not _is_image(source):
                    raise InputError(f"images: sample {b}, image {j} is a {type(source).__name__}, not an image")
        return batch if any(batch) else None

    def _check_counts(self, texts: list[str] | None, batch: list[list] | None) -> None:
        if texts is None:
            if batch is None:
                raise InputError("Nothing to process: pass text, images or both")
            return
        token = self.image_tokens.image
        in_text = [t.count(token) for t in texts]
        if batch is None:
            if any(in_text):
                raise InputError(f"Found {in_text} {token} tokens per prompt but no images were passed")
            return
        in_images = [len(sample) for sample in batch]
        if sum(in_text) != sum(in_images):
            per_prompt = f" ({in_images} per prompt)" if len(in_images) == len(in_text) else ""
            raise InputError(f"The prompts hold {sum(in_text)} {token} tokens ({in_text} per prompt) but "
                             f"{sum(in_images)} images were passed{per_prompt}: each image needs one {token}")
        if in_text != in_images:
            hint = ""
            if len(in_images) != len(in_text):
                hint = (f" ({len(texts)} prompts but images for {len(in_images)}: pass one list of images per prompt, "
                        "e.g. [[img1], [img2, img3]])")
            raise InputError(f"Each prompt needs one {token} per image: found {in_text} {token} tokens and "
                             f"{in_images} images per prompt{hint}")

    # -- chat --

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False,
                            chat_template: str | None = None, **kwargs):
        """Render messages (or a list of conversations) with the checkpoint's chat template.

        Returns the prompt string (a list of strings for a batch), or with `tokenize=True` the model inputs for it
        and the images its messages hold (image blocks with "image", "url", "path" or "base64", or OpenAI
        `image_url` blocks), batched over conversations. Keyword arguments that `__call__` takes (padding_side,
        max_length, do_image_splitting, ...) go to it; the others are variables for the template.

        Differences from the reference: a message whose content is a plain string is one text block (the
        reference's template renders it as nothing), and add_generation_prompt defaults to True.
        """
        call_kwargs = {k: kwargs.pop(k) for k in CALL_KWARGS if k in kwargs}
        conversations, batched = normalize_conversations(messages)
        if chat_template is None and has_video(conversations):  # the checkpoints' templates have no video branch
            chat_template = VIDEO_CHAT_TEMPLATE
        template = self._template(chat_template)
        prompts = render(template, conversations, add_generation_prompt, **{**self.settings.special_tokens, **kwargs})
        if not tokenize:
            if call_kwargs:
                raise InputError(f"{sorted(call_kwargs)} only apply with tokenize=True")
            return prompts if batched else prompts[0]
        images, videos = collect_media(conversations)
        return self(text=prompts, images=images if any(images) else None, videos=videos if any(videos) else None,
                    **call_kwargs)

    def _template(self, chat_template: str | None) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            name = chat_template or "default"
            if name in templates:
                return templates[name]
            if chat_template is None:
                raise ConfigError(f"The checkpoint has several chat templates ({', '.join(templates)}) and none is "
                                  "named 'default': pass chat_template=<name>")
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ConfigError("The checkpoint has no chat template (chat_template.jinja, chat_template.json or "
                              "tokenizer_config.json's chat_template)")
        return templates

    # -- ids -> text --

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        ids = [_id_list(row) for row in sequences]
        return self.tokenizer.decode_batch(ids, skip_special_tokens=skip_special_tokens)


def _is_image(x) -> bool:
    return isinstance(x, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, np.ndarray, torch.Tensor))


def _texts(text) -> list[str] | None:
    if text is None:
        return None
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
        return list(text)
    raise InputError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")


def _load(source, sample: int, index: int) -> Image.Image:
    try:
        return load_image(source)
    except InputError as e:
        raise InputError(f"Sample {sample}, image {index}: {e}") from e


def _id_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise InputError(f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


def _family(folder: Path, processor_config: dict, preprocessor: dict) -> str:
    for name, d in (("processor_config.json", processor_config), ("preprocessor_config.json", preprocessor)):
        if "processor_class" in d:
            if d["processor_class"] not in FAMILIES:
                raise ConfigError(f"{folder / name}: field 'processor_class' = {d['processor_class']!r}: expected "
                                  f"one of {', '.join(FAMILIES)}")
            return FAMILIES[d["processor_class"]]
    model_type = (read_json(folder, "config.json", required=False) or {}).get("model_type")
    if model_type in FAMILIES.values():
        return model_type
    raise ConfigError(f"{folder}: can't tell the checkpoint family: no 'processor_class' in processor_config.json or "
                      "preprocessor_config.json, and config.json's model_type is not idefics3 or smolvlm")


def _chat_template(folder: Path, tokenizer_config: dict) -> str | dict | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's (a string, or named templates)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{jinja}: not UTF-8 text ({e})") from e
    for name, d in (("chat_template.json", read_json(folder, "chat_template.json", required=False)),
                    ("tokenizer_config.json", tokenizer_config)):
        template = (d or {}).get("chat_template")
        if template is None:
            continue
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            try:
                template = {t["name"]: t["template"] for t in template}
            except (TypeError, KeyError) as e:
                raise ConfigError(f"{folder / name}: field 'chat_template' is a list whose items are not "
                                  "{'name': ..., 'template': ...}") from e
        if not isinstance(template, (str, dict)) or isinstance(template, dict) and not all(
                isinstance(v, str) for v in template.values()):
            raise ConfigError(f"{folder / name}: field 'chat_template': expected a Jinja template string")
        return template
    return None
