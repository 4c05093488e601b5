"""Inference fast paths: fused projections, weights in the layout the device's kernels read fastest, int8.

`Model.fuse()` swaps the HF-named `nn.Linear` layers for `FastLinear`s, in place:

- q/k/v become one `qkv_proj` (text and vision), gate/up one `gate_up_proj`, the vision fc1 one `fc1_gelu` with its
  GELU run inside the matmul: fewer, larger matrix products per layer.
- On the CPU every weight is reordered once into oneDNN's blocked layout. torch's plain `F.linear` re-lays the weight
  out on every call, which is what makes batch-1 decoding slow there: a reordered bf16 weight is read about twice as
  fast (mkldnn `_linear_pointwise`, the kernel torch.compile's CPU freezing pass uses).
- `quantize="int8"`: the text decoder's and lm_head's weights become int8 with one scale per output channel
  (symmetric), run by fbgemm's dynamic-quantized matmul, which also quantizes each call's activations to 8 bits
  (one scale per call) and reads half the bytes of bf16. The vision tower and connector keep the model's dtype.

`Model.unfuse()` gives back the HF module tree (exactly for an unquantized model; dequantized weights for int8), so
training, LoRA and `state_dict()` always see the released checkpoint's names. A fused model is for inference only.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

QUANTIZE = ("int8",)


class FastLinear(nn.Module):
    """One or more HF linear layers (`parts`, concatenated along the output) as one inference-only matmul.

    kind: "mkldnn" (CPU, oneDNN-reordered weight), "int8" (CPU, fbgemm packed int8 weight + bias), "dense" (F.linear).
    activation "gelu_tanh" applies the tanh GELU to the output (inside the matmul for "mkldnn").
    """

    def __init__(self, linears: dict[str, nn.Linear], quantize: str | None = None, activation: str | None = None):
        super().__init__()
        first = next(iter(linears.values()))
        self.parts = {name: layer.out_features for name, layer in linears.items()}  # for unfuse
        self.activation = activation
        self.dtype, self.device = first.weight.dtype, first.weight.device
        with torch.no_grad():
            weight = torch.cat([layer.weight for layer in linears.values()])  # [N, K]
            has_bias = first.bias is not None
            bias = torch.cat([layer.bias for layer in linears.values()]) if has_bias else None
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if quantize == "int8":
            self.kind = "int8"
            self.packed, self.bias = _pack_int8(weight.float(), None if bias is None else bias.float()), None
        elif self.device.type == "cpu" and _mkldnn_ok(self.dtype):
            self.kind = "mkldnn"
            self.weight, self.bias = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None), bias
        else:
            self.kind, self.weight, self.bias = "dense", weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mkldnn":
            attr, algorithm = ("gelu", "tanh") if self.activation else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, [], algorithm)
        if self.kind == "int8":
            y = torch.ops.quantized.linear_dynamic(x.float(), self.packed, False).to(x.dtype)
        else:
            y = F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if self.activation else y

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [N, K], bias [N] or None) in the model's dtype; int8 weights come back dequantized."""
        if self.kind == "int8":
            weight, bias = torch.ops.quantized.linear_unpack(self.packed)
            weight = weight.dequantize()
        else:
            weight, bias = (self.weight.to_dense() if self.kind == "mkldnn" else self.weight), self.bias
        return weight.to(self.dtype), None if bias is None else bias.to(self.dtype)

    def unfuse(self) -> dict[str, nn.Linear]:
        """The HF linear layers this one replaced, by name, with their own weights."""
        weight, bias = self.dense()
        layers = {}
        for (name, n), w, b in zip(
            self.parts.items(),
            weight.split(list(self.parts.values())),
            bias.split(list(self.parts.values())) if bias is not None else [None] * len(self.parts),
        ):
            layer = nn.Linear(self.in_features, n, bias=b is not None, device="meta")
            layer.weight = nn.Parameter(w.clone())
            if b is not None:
                layer.bias = nn.Parameter(b.clone())
            layers[name] = layer
        return layers

    def extra_repr(self) -> str:
        parts = "+".join(self.parts)
        act = f", {self.activation}" if self.activation else ""
        return f"{parts}: {self.in_features} -> {self.out_features}, {self.kind} {str(self.dtype).removeprefix('torch.')}{act}"


def _mkldnn_ok(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _pack_int8(weight: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed form of `weight` [N, K] fp32 as int8 with per-output-channel symmetric scales."""
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()  # [N]
    zero = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch 2.13 deprecates the quantized dtypes that fbgemm's packing takes; the kernel itself is unchanged.
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qweight, bias)


def check_quantize(quantize: str | None, device: torch.device) -> None:
    """Raise InputError unless `quantize` is None or a method this torch build can run on `device`."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise InputError(f"quantize={quantize!r} is not supported; use one of {', '.join(QUANTIZE)} (or None)")
    if device.type != "cpu":
        raise InputError(f"quantize={quantize!r} runs on the CPU only (fbgemm kernels); got device {str(device)!r}")
    if torch.backends.quantized.engine not in ("x86", "fbgemm") or not hasattr(torch.ops.quantized, "linear_dynamic"):
        raise InputError(
            f"quantize={quantize!r} needs torch's fbgemm int8 kernels (x86 CPUs); this build's quantized engine is "
            f"{torch.backends.quantized.engine!r}"
        )


# Module class name -> (fused attribute, the HF layers it replaces, activation), and whether int8 applies to it.
# A fused attribute that differs from its parts is None in the unfused model (e.g. Attention.qkv_proj).
FUSIONS = {
    "Attention": ([("qkv_proj", ("q_proj", "k_proj", "v_proj"), None), ("o_proj", ("o_proj",), None)], True),
    "MLP": ([("gate_up_proj", ("gate_proj", "up_proj"), None), ("down_proj", ("down_proj",), None)], True),
    "VisionAttention": ([("qkv_proj", ("q_proj", "k_proj", "v_proj"), None), ("out_proj", ("out_proj",), None)], False),
    "VisionMLP": ([("fc1_gelu", ("fc1",), "gelu_tanh"), ("fc2", ("fc2",), None)], False),
    "ModalityProjection": ([("proj", ("proj",), None)], False),
    "Model": ([("lm_head", ("lm_head",), None)], True),
}


def fuse(model: nn.Module, quantize: str | None = None) -> None:
    """Swap `model`'s HF linear layers for FastLinears (see the module docstring), in place, one layer at a time
    (the old weights are freed as each is replaced, so memory never holds two copies of the model)."""
    for module in list(model.modules()):
        fusions, quantizable = FUSIONS.get(type(module).__name__, ([], False))
        for attr, parts, activation in fusions:
            layers = {name: getattr(module, name) for name in parts}
            if any(not isinstance(layer, nn.Linear) for layer in layers.values()):
                continue  # already fused
            fast = FastLinear(layers, quantize if quantizable else None, activation)
            for name in parts:
                setattr(module, name, None)
            setattr(module, attr, fast)


def unfuse(model: nn.Module) -> None:
    """Give back the HF linear layers, in place (inverse of `fuse`)."""
    for module in list(model.modules()):
        for attr, fast in list(module.named_children()):
            if isinstance(fast, FastLinear):
                setattr(module, attr, None)
                for name, layer in fast.unfuse().items():
                    setattr(module, name, layer)
    if model.config.tie_word_embeddings:  # a fused lm_head held its own copy of the embedding matrix
        model.lm_head.weight = model.model.text_model.embed_tokens.weight


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FastLinear) for m in model.modules())
