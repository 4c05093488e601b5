"""Checkpoints the tests make themselves, and a check run on them.

`make_tiny_checkpoint` builds a tiny random SmolVLM with the *reference* (transformers) classes, saves it with
`save_pretrained`, and puts the real tokenizer, chat template and generation config of a released checkpoint next to
it, with processor settings shrunk to the tiny vision tower. The result is a complete checkpoint folder, exactly what
`smolvlm.load` reads for a real model, that builds in about a second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from smolvlm import Model
from smolvlm.generation.sampling import Sampler
from smolvlm.model.fast import decoder_weights
from smolvlm.model.kv_cache import KVCache

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHECKPOINT_FILES = SHARED / "checkpoint-files"
V1_FILES = CHECKPOINT_FILES / "SmolVLM-256M-Instruct"
V2_FILES = CHECKPOINT_FILES / "SmolVLM2-500M-Video-Instruct"
FAMILY_FILES = {"idefics3": V1_FILES, "smolvlm": V2_FILES}

needs_shared = pytest.mark.skipif(
    not CHECKPOINT_FILES.is_dir(),
    reason=f"the real checkpoint files (tokenizer, configs) are not at {CHECKPOINT_FILES}",
)

# Files copied unchanged from the released checkpoint next to the tiny weights.
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "generation_config.json",
]

# Tiny shapes: 64px tiles of 8px patches -> 8x8 patches, scale 2 -> 16 image tokens per tile.
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8
)
TINY_TEXT = dict(
    vocab_size=49280,  # the real tokenizer's vocabulary
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=4096,
    pad_token_id=2,
)
TINY_SCALE_FACTOR = 2
TINY_IMAGE_SEQ_LEN = 16
TINY_LONGEST_EDGE = 128  # images become at most 2x2 tiles + the global image


def reference_config(family: str = "smolvlm", vision: dict | None = None, text: dict | None = None, **top):
    """A transformers config (the reference's class) for a tiny model of the given family."""
    from transformers import Idefics3Config, SmolVLMConfig

    cls = SmolVLMConfig if family == "smolvlm" else Idefics3Config
    kw = dict(image_token_id=49190, scale_factor=TINY_SCALE_FACTOR, tie_word_embeddings=False)
    kw.update(top)
    return cls(vision_config={**TINY_VISION, **(vision or {})}, text_config={**TINY_TEXT, **(text or {})}, **kw)


def reference_model(config, seed: int = 0, init_std: float | None = None):
    """A random reference model in fp32 with eager attention (the bit-exact oracle)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="eager").float().eval()
    if init_std is not None:  # the default init (std 0.02) makes near-uniform logits; larger weights give varied text
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0.0, init_std)
    return model


def write_processor_files(folder: Path, family: str, image_seq_len: int, longest_edge: int, tile: int) -> None:
    """Copy the real tokenizer/template files of `family` into `folder`, shrinking the image settings."""
    src = FAMILY_FILES[family]
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, folder / name)
    pre = json.loads((src / "preprocessor_config.json").read_text())
    pre["size"] = {"longest_edge": longest_edge}
    pre["max_image_size"] = {"longest_edge": tile}
    if "video_sampling" in pre:
        pre["video_sampling"]["video_size"] = {"longest_edge": longest_edge}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    proc = json.loads((src / "processor_config.json").read_text())
    proc["image_seq_len"] = image_seq_len
    (folder / "processor_config.json").write_text(json.dumps(proc, indent=2))


def make_tiny_checkpoint(
    folder: Path,
    family: str = "smolvlm",
    seed: int = 0,
    init_std: float | None = 0.15,
    dtype: str = "float32",
    vision: dict | None = None,
    text: dict | None = None,
    **top,
) -> Path:
    """Save a complete tiny checkpoint (weights + real tokenizer/processor files) into `folder` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = reference_config(family, vision, text, **top)
    model = reference_model(config, seed=seed, init_std=init_std)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    vc = config.vision_config
    n = vc.image_size // vc.patch_size
    seq_len = (n // config.scale_factor) ** 2
    write_processor_files(folder, family, seq_len, TINY_LONGEST_EDGE * vc.image_size // 64, vc.image_size)
    return folder


def decode_step_both(folder, dtype, positions, quantize=None):
    """Logits of one decode step at `positions` [n] by the C++ step (fused model) and by the plain text model (the
    same model unfused), each over its own copy of one cache filled by a prefill; and the two caches after."""
    model = Model.from_pretrained(folder, dtype=dtype, fuse=True, quantize=quantize)
    assert decoder_weights(model) is not None
    t = model.config.text_config
    n, length = len(positions), int(positions.max()) + 1
    cache = KVCache(t.num_hidden_layers, n + 1, t.num_key_value_heads, 64, t.head_dim)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, t.vocab_size, (n, length), generator=g)
    tokens = torch.randint(0, t.vocab_size, (n,), generator=g)
    with torch.inference_mode():
        steps = torch.arange(length).expand(n, length)
        model.model.text_model(model.embed(prompt), steps, cache=cache, cache_positions=steps)  # prefill
        plain_cache = KVCache(t.num_hidden_layers, n + 1, t.num_key_value_heads, 64, t.head_dim)
        plain_cache.k.copy_(cache.k), plain_cache.v.copy_(cache.v)
        fast = model.decode(tokens, positions, cache, keys=64)
        model.unfuse()
        assert decoder_weights(model) is None
        plain = model.decode(tokens, positions, plain_cache, keys=64)
    return fast.float(), plain.float(), cache, plain_cache


class Recorder(Sampler):
    """The real sampler, keeping the logits of every row it samples (in the order the engine's step reports them)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.logits = []

    def __call__(self, logits, start=0):
        self.logits += list(logits.float())
        return super().__call__(logits, start)


def compiled_or_fallback(request, monkeypatch, module, unavailable: str) -> str:
    """Body of a fixture with params ["compiled", "fallback"]: run with `module`'s C++ code (skipped with the reason
    `unavailable` where it can't be built), or as where it can't (its `load()` says None)."""
    if request.param == "compiled" and module.load() is None:
        pytest.skip(unavailable)
    if request.param == "fallback":
        monkeypatch.setattr(module, "load", lambda: None)
    return request.param

