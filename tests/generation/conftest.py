"""Engines over the tiny checkpoints, and prompts built by hand (so these tests don't depend on the processor)."""

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer

from smolvlm.generation import Engine, Prompt, end_token_ids
from smolvlm.generation.engine import PREFILL_CHUNK
from smolvlm.model.vlm import Model
from tiny import TINY_IMAGE_SEQ_LEN

IMAGE_BLOCK = "<fake_token_around_image><global-img>" + "<image>" * TINY_IMAGE_SEQ_LEN + "<fake_token_around_image>"


class Tiny:
    """One tiny checkpoint: our model (fp32, or bf16 fused: the C++ kernels where they run), its tokenizer, the
    reference model, and prompt / engine builders."""

    def __init__(self, folder, dtype="float32", device="cpu"):
        self.folder = folder
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.model = Model.from_pretrained(folder, dtype=dtype, device=device, fuse=dtype != "float32")
        self.end_ids = end_token_ids(folder, self.tokenizer)
        self._reference = None

    @property
    def reference(self):
        if self._reference is None:
            from transformers import AutoModelForImageTextToText

            self._reference = AutoModelForImageTextToText.from_pretrained(self.folder, attn_implementation="eager")
            self._reference.float().eval()
        return self._reference

    def engine(self, max_batch=4, max_len=512, end_ids=None, caches=None, prefill_chunk=PREFILL_CHUNK,
               **options) -> Engine:
        processor = SimpleNamespace(tokenizer=self.tokenizer, pad_token_id=2)  # all the engine uses of a Processor
        end_ids = self.end_ids if end_ids is None else end_ids
        return Engine(self.model, processor, end_ids, max_batch, max_len, caches, prefill_chunk, **options)

    def prompt(self, text: str, n_images: int = 0, seed: int = 0, pixels: torch.Tensor | None = None) -> Prompt:
        """A chat prompt with `n_images` unsplit images (one 64x64 frame each) of random pixels before the text, or
        the frames `pixels` [I, 3, 64, 64]."""
        if pixels is None and n_images:
            g = torch.Generator().manual_seed(seed)
            pixels = torch.rand(n_images, 3, 64, 64, generator=g) * 2 - 1
        n_images = 0 if pixels is None else len(pixels)
        s = f"<|im_start|>User:{IMAGE_BLOCK * n_images}{text}<end_of_utterance>\nAssistant:"
        ids = torch.tensor(self.tokenizer.encode(s).ids)
        if not n_images:
            return Prompt(ids)
        return Prompt(ids, pixels, torch.ones(n_images, 64, 64, dtype=torch.long))

    def reference_greedy(self, prompts: list[Prompt], max_new_tokens: int) -> list[list[int]]:
        """transformers' greedy generate on the prompts as one left-padded batch; each row cut after its end token."""
        t = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), t), 2)
        mask = torch.zeros(len(prompts), t, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, t - len(p) :], mask[i, t - len(p) :] = p.input_ids, 1
        kw = {}
        n_images = max(0 if p.pixel_values is None else p.pixel_values.shape[0] for p in prompts)
        if n_images:  # zero frames pad each row to the same image count, as the reference processor does
            kw["pixel_values"] = torch.zeros(len(prompts), n_images, 3, 64, 64)
            kw["pixel_attention_mask"] = torch.zeros(len(prompts), n_images, 64, 64, dtype=torch.long)
            for i, p in enumerate(prompts):
                if p.pixel_values is not None:
                    kw["pixel_values"][i, : len(p.pixel_values)] = p.pixel_values
                    kw["pixel_attention_mask"][i, : len(p.pixel_values)] = p.pixel_attention_mask
        out = self.reference.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kw
        )[:, t:].tolist()
        rows = []
        for row in out:
            ends = [i for i, tok in enumerate(row) if tok in self.end_ids]
            rows.append(row[: ends[0] + 1] if ends else row)
        return rows


@pytest.fixture(scope="session")
def v2(tiny_v2):
    return Tiny(tiny_v2)


@pytest.fixture(scope="session")
def v2_bf16(tiny_v2):
    return Tiny(tiny_v2, "bfloat16")


@pytest.fixture(scope="session")
def make_tiny():
    """Tiny(folder, dtype, device): for models on other devices (the CUDA tests)."""
    return Tiny


@pytest.fixture(scope="session")
def v1(tiny_v1):
    return Tiny(tiny_v1)
