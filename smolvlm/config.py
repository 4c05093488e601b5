"""Model configuration: dataclasses parsed from a checkpoint's config.json.

Field names are the HF keys. Defaults are the reference's (transformers 5.23) for keys a file omits, and the legacy
spellings real files carry are accepted: `torch_dtype` (v5 writes `dtype`), a top-level `rope_theta` in the text
config (v5 writes `rope_parameters: {rope_type, rope_theta}`), `rope_scaling`, the out-of-vocab top-level
`pad_token_id` (128002, ignored like v5 does). Keys the model does not use are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError

MODEL_TYPES = ("idefics3", "smolvlm")  # v1 (Idefics3 classes) and v2 (SmolVLM classes)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class VisionConfig:
    """SigLIP vision tower. Defaults are Idefics3VisionConfig's / SmolVLMVisionConfig's (they are the same)."""

    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @property
    def patches_per_side(self) -> int:
        # 384 // 14 = 27 for the 2.2B models: the conv ignores the 6-pixel remainder, as the reference does.
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """SmolLM2 (Llama) decoder. Defaults are LlamaConfig's (the reference uses 1e-5 for rms_norm_eps only when the
    file has no text_config at all, see SmolVLMConfig.from_dict; every released checkpoint sets it to 1e-5)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    pad_token_id: int | None = None  # the embedding's padding_idx (no effect on the forward pass)
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int):
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)


@dataclass
class SmolVLMConfig:
    model_type: str = "smolvlm"
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    scale_factor: int = 2
    image_token_id: int = 128257
    tie_word_embeddings: bool = False
    dtype: str | None = None  # the checkpoint's own dtype ("float32", "bfloat16", "float16"); None: float32

    @property
    def image_seq_len(self) -> int:
        """Tokens per image tile: (image_size // patch_size)^2 / scale_factor^2."""
        return (self.vision_config.patches_per_side // self.scale_factor) ** 2

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> SmolVLMConfig:
        """Read `folder/config.json`."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            if (Path(folder) / "adapter_config.json").is_file():
                raise CheckpointError(f"{folder} is a LoRA adapter folder (adapter_config.json), not a checkpoint: "
                                      f"load it with smolvlm.load({str(folder)!r}) or --model {folder} (its base model "
                                      f"comes from adapter_config.json), or --model BASE --adapter {folder}")
            raise CheckpointError(f"No config.json in {folder}: not a SmolVLM checkpoint folder")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> SmolVLMConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: field 'model_type' is {model_type!r}; expected one of {', '.join(MODEL_TYPES)} "
                "(SmolVLM v1 checkpoints say 'idefics3', SmolVLM2 ones 'smolvlm')"
            )
        text = _sub_dict(d, "text_config", source)
        if d.get("text_config") is None:  # as SmolVLMConfig/Idefics3Config: a default text config gets eps 1e-5
            text = {"rms_norm_eps": 1e-5}
        if text.get("model_type", "llama") != "llama":
            raise ConfigError(f"{source}: field 'text_config.model_type' is {text['model_type']!r}; expected 'llama'")
        top = _fields(cls, d, source, "", skip=("model_type", "vision_config", "text_config", "dtype"))
        vision = _fields(VisionConfig, _sub_dict(d, "vision_config", source), source, "vision_config.")
        text_fields = _fields(TextConfig, text, source, "text_config.", skip=("rope_theta",))
        config = cls(
            model_type=model_type,
            vision_config=VisionConfig(**vision),
            text_config=TextConfig(**text_fields, rope_theta=_rope_theta(text, source)),
            dtype=_dtype(d, source),
            **top,
        )
        config.validate(source)
        return config

    def validate(self, source: str = "config.json") -> None:
        """Raise ConfigError naming the field when sizes are inconsistent or a feature is not supported."""
        v, t = self.vision_config, self.text_config

        def fail(name: str, value: Any, why: str):
            raise ConfigError(f"{source}: field '{name}' = {value!r}: {why}")

        def check_divides(name: str, divisor: int, what: str, total: int):
            if total % divisor:
                fail(name, divisor, f"{what} {total} is not divisible by it")

        for prefix, cfg in (("vision_config.", v), ("text_config.", t), ("", self)):
            for f in dataclasses.fields(cfg):
                value = getattr(cfg, f.name)
                if isinstance(value, int) and not isinstance(value, bool) and value <= 0 and f.name != "pad_token_id":
                    fail(prefix + f.name, value, "must be a positive integer")
        check_divides(
            "vision_config.num_attention_heads", v.num_attention_heads, "vision_config.hidden_size", v.hidden_size
        )
        # image_size need not be a multiple of patch_size: the 2.2B models use 384 / 14 (a 27x27 grid, 6 pixels unused).
        if v.image_size < v.patch_size:
            fail("vision_config.patch_size", v.patch_size, f"larger than vision_config.image_size {v.image_size}")
        n = v.patches_per_side
        if n % self.scale_factor:
            fail(
                "scale_factor",
                self.scale_factor,
                f"the {n}x{n} patch grid (image_size {v.image_size} // patch_size {v.patch_size}) is not divisible "
                "by it, so the pixel shuffle can't group patches",
            )
        if v.hidden_act != "gelu_pytorch_tanh":
            fail("vision_config.hidden_act", v.hidden_act, "only 'gelu_pytorch_tanh' is supported")
        check_divides(
            "text_config.num_attention_heads", t.num_attention_heads, "text_config.hidden_size", t.hidden_size
        )
        check_divides(
            "text_config.num_key_value_heads",
            t.num_key_value_heads,
            "text_config.num_attention_heads",
            t.num_attention_heads,
        )
        if t.head_dim % 2:
            fail("text_config.head_dim", t.head_dim, "must be even for rotary embeddings")
        if t.hidden_act != "silu":
            fail("text_config.hidden_act", t.hidden_act, "only 'silu' is supported")
        for name in ("attention_bias", "mlp_bias"):
            if getattr(t, name):
                fail(f"text_config.{name}", True, "biases in the decoder are not supported")
        if not 0 <= self.image_token_id < t.vocab_size:
            why = f"outside the vocabulary (text_config.vocab_size {t.vocab_size})"
            fail("image_token_id", self.image_token_id, why)


def _sub_dict(d: dict, key: str, source: str) -> dict:
    sub = d.get(key)
    if sub is None:
        return {}
    if not isinstance(sub, dict):
        raise ConfigError(f"{source}: field '{key}' must be an object, got {type(sub).__name__}")
    return sub


def _fields(cls, d: dict, source: str, prefix: str, skip: tuple[str, ...] = ()) -> dict:
    """The keys of `d` that are fields of dataclass `cls`, type-checked (unknown keys are ignored)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in d:
            continue
        value = d[f.name]
        if value is None and "None" in str(f.type):
            out[f.name] = None
            continue
        kind = f.type.split(" |")[0] if isinstance(f.type, str) else f.type.__name__
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }[kind]
        if not ok:
            raise ConfigError(f"{source}: field '{prefix}{f.name}' = {value!r}: expected {kind}")
        out[f.name] = float(value) if kind == "float" else value
    return out


def _rope_theta(text: dict, source: str) -> float:
    """rope_theta from v5 `rope_parameters`, legacy `rope_scaling`, or the legacy top-level key (default 10000)."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: field 'text_config.rope_parameters' must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{source}: field 'text_config.rope_parameters.rope_type' = {rope_type!r}: only 'default' RoPE is supported"
        )
    theta = params.get("rope_theta", text.get("rope_theta", TextConfig.rope_theta))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{source}: field 'text_config.rope_theta' = {theta!r}: expected a positive number")
    return float(theta)


def _dtype(d: dict, source: str) -> str | None:
    key = "dtype" if d.get("dtype") is not None else "torch_dtype"
    value = d.get(key)
    if value is None:
        return None
    if value not in DTYPES:
        raise ConfigError(f"{source}: field '{key}' = {value!r}: expected one of {', '.join(DTYPES)}")
    return value
