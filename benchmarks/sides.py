"""The two sides of benchmarks/bench.py: smolvlm and the reference (transformers 5.23), each running one request the
same way (raw conversation -> processor -> model -> N new tokens, end tokens ignored so every run makes exactly N).

A side is built once per worker process: `Side.load(folder, dtype, device, quantize)`, then `run(conversations, N,
split)` returns the timings of one request (a list of conversations is one batch) and `vision(conversations, split)`
times the vision tower alone on the processor's tiles.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Timing:
    preprocess_s: float  # conversations -> model inputs
    token_times: list[float]  # seconds from the start of the request to each new token (batch: each step)
    tiles: int  # vision frames encoded
    prompt_tokens: int  # of the longest prompt
    text: str = ""  # the (first) answer
    cached_tokens: int = 0  # of the (first) prompt, from the prefix cache

    @property
    def ttft_s(self) -> float:
        return self.token_times[0]

    @property
    def total_s(self) -> float:
        return self.token_times[-1]

    @property
    def decode_tps(self) -> float:
        """Tokens per second per row after the first token."""
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    name = "smolvlm"

    def __init__(self, folder: Path, dtype: str, device: str, quantize: str | None):
        import smolvlm

        start = time.perf_counter()
        self.folder = Path(folder)
        self.vlm = smolvlm.load(folder, dtype=dtype, device=device, quantize=quantize, progress=False)
        self.load_s = time.perf_counter() - start
        self.model, self.processor, self.device = self.vlm.model, self.vlm.processor, self.vlm.model.device
        self.engines = {}  # (batch, cached) -> Engine

    def _prompts(self, conversations, split, cached: bool = False):
        from smolvlm.generation import prepare_all

        images = self.vlm.caches.images if cached else None  # processed images of earlier runs
        return prepare_all(self.processor, conversations, do_image_splitting=split, image_cache=images)

    def clear(self) -> None:
        """Empty the caches (`smolvlm.load`'s, the default budget)."""
        self.vlm.caches.clear()

    def engine(self, batch: int, length: int, cached: bool = False, **options):
        """An engine sized like smolvlm.load's (room for the prompts and the answers), kept for the next run; with
        the caches of `smolvlm.load` (cached) or none."""
        from smolvlm.generation import Engine

        length = -(-length // 256) * 256
        engine = self.engines.get((batch, cached))
        if engine is None or engine.max_len < length or options:
            self.engines.pop((batch, cached), None)
            engine = Engine(self.model, self.processor, [], max_batch=batch, max_len=length,
                            caches=self.vlm.caches if cached else None, **options)
            if not options:
                self.engines[batch, cached] = engine
        return engine

    def run(self, conversations, new_tokens: int, split: bool, cached: bool = False) -> Timing:
        from smolvlm.generation import SamplingParams

        start = time.perf_counter()
        prompts = self._prompts(conversations, split, cached)
        preprocess = time.perf_counter() - start
        longest = max(len(p) for p in prompts)
        engine = self.engine(len(prompts), longest + new_tokens, cached)
        first = [engine.add_request(p, SamplingParams(max_new_tokens=new_tokens)) for p in prompts][0]
        times, text, cached_tokens = [], "", 0
        while engine.has_unfinished():
            for out in engine.step():  # reads the sampled tokens: a host sync
                if out.request_id == first:
                    text, cached_tokens = text + out.text, out.cached_tokens
            times.append(time.perf_counter() - start)
        tiles = sum(0 if p.pixel_values is None else p.pixel_values.shape[0] for p in prompts)
        return Timing(preprocess, times, tiles, longest, text, cached_tokens)

    def vision(self, conversations, split: bool) -> tuple[float, int]:
        prompts = self._prompts(conversations, split)
        pixels = torch.cat([p.pixel_values for p in prompts])[None]
        masks = torch.cat([p.pixel_attention_mask for p in prompts])[None]
        return timed_encode(self, pixels, masks), pixels.shape[1]

    def encode(self, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The vision tower and connector on frames [B, I, 3, S, S] (on the side's device) with masks [B, I, S, S]."""
        return self.model.get_image_features(pixels, masks)


class Reference:
    """transformers' SmolVLMForConditionalGeneration (SDPA attention) and SmolVLMProcessor (PIL backend)."""

    name = "reference"

    def __init__(self, folder: Path, dtype: str, device: str, quantize: str | None):
        from transformers import AutoModelForImageTextToText

        if quantize:
            raise SystemExit("the reference side has no quantize option")
        start = time.perf_counter()
        self.processor = _reference_processor(Path(folder))
        self.model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=getattr(torch, dtype), attn_implementation="sdpa"
        ).to(device).eval()
        self.load_s = time.perf_counter() - start
        self.device = torch.device(device)

    def _inputs(self, conversations, split):
        kwargs = dict(do_image_splitting=split, padding=True, padding_side="left")
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs=kwargs,
        )
        return inputs.to(self.device)

    def clear(self) -> None:
        """The reference has no cache across calls."""

    def run(self, conversations, new_tokens: int, split: bool, cached: bool = False) -> Timing:
        """`cached` is ignored: the reference has no cache across calls."""
        from transformers.generation.streamers import BaseStreamer

        device = self.device

        class Clock(BaseStreamer):  # generate() hands it the prompt first, then each step's new tokens
            def __init__(self):
                self.times = []

            def put(self, value):
                _sync(device)
                self.times.append(time.perf_counter() - start)

            def end(self):
                pass

        start = time.perf_counter()
        inputs = self._inputs(conversations, split)
        preprocess = time.perf_counter() - start
        clock = Clock()
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      streamer=clock)
        tiles = 0
        if "pixel_values" in inputs:
            tiles = int((inputs["pixel_values"] != 0).flatten(2).any(-1).sum())  # real frames, not padding
        t = inputs["input_ids"].shape[1]
        text = self.processor.tokenizer.decode(out[0, t:], skip_special_tokens=True)
        return Timing(preprocess, clock.times[1:], tiles, t, text)

    def vision(self, conversations, split: bool) -> tuple[float, int]:
        inputs = self._inputs(conversations, split)
        pixels = inputs["pixel_values"]
        return timed_encode(self, pixels, inputs["pixel_attention_mask"]), pixels.shape[0] * pixels.shape[1]

    def encode(self, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.model.model.get_image_features(pixel_values=pixels.to(self.model.dtype), pixel_attention_mask=masks)


@torch.inference_mode()
def timed_encode(side, pixels: torch.Tensor, masks: torch.Tensor) -> float:
    """Seconds of one `side.encode` of frames already on the side's device (synced before and after)."""
    pixels, masks = pixels.to(side.device), masks.to(side.device)
    _sync(side.device)
    start = time.perf_counter()
    side.encode(pixels, masks)
    _sync(side.device)
    return time.perf_counter() - start


def _reference_processor(folder: Path):
    """SmolVLMProcessor from its parts: its AutoProcessor also builds a video processor that needs torchvision, which
    is not installed here, so a stand-in gives the two numbers apply_chat_template reads from it (as in the tests)."""
    from transformers import AutoTokenizer
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    class StandInVideoProcessor:
        num_frames, fps = 64, 1

    class ReferenceProcessor(SmolVLMProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            return None

    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    seq_len = json.loads((folder / "processor_config.json").read_text())["image_seq_len"]
    return ReferenceProcessor(SmolVLMImageProcessorPil.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                              StandInVideoProcessor(), image_seq_len=seq_len, chat_template=template)


SIDES = {"ours": Ours, "reference": Reference}
