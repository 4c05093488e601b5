"""QLoRA: the frozen base's linear layers held in 4-bit NF4 with double quantization (bitsandbytes `Linear4bit`, as
the official SmolVLM fine-tuning notebook loads it), LoRA adapters in bf16/fp32 on top through peft.

Quantization is a module swap at load time: every `nn.Linear` of the text model, the vision encoder and the connector
becomes a `bnb.nn.Linear4bit` holding the same weight in NF4 (64-weight blocks, each with an absmax scale, the scales
themselves quantized to 8 bits in blocks of 256: ~4.13 bits per weight). `lm_head`, embeddings and norms stay in the
compute dtype (as transformers' `load_in_4bit` leaves them). The model code is untouched: a `Linear4bit` is an
`nn.Linear` whose forward dequantizes its weight to the compute dtype and runs the same matmul.

bitsandbytes >= 0.48 runs NF4 on the CPU as well (its torch fallback quantizes, dequantizes and multiplies; the optional
`kernels` package only speeds the CPU matmul up), so one implementation serves CPU and CUDA. (torchao's NF4Tensor, the
alternative torchtune uses, refuses weights whose block count is not a multiple of 256, like SigLIP's 1152 x 4304 fc2.)
One CPU defect is worked around here: bitsandbytes 0.50's CPU dequantize kernel gets rows that end mid-block wrong
(in_features not a multiple of the 64-weight block: SigLIP's fc2 has 4304), so such layers store their weight with
in_features zero-padded to the block and pad their input to match (`PaddedLinear4bit`; the product is unchanged).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SmolVLMConfig
from ..errors import InputError
from ..model import Model
from ..weights import read_shapes, read_tensor, weight_files
from .extras import need

QUANTIZED_PARTS = ("text_model", "vision_model", "connector")  # under model.model; lm_head stays in compute dtype
BLOCK = 64  # weights per NF4 absmax (bitsandbytes' default, the QLoRA paper's)
FEATURE = "--qlora (4-bit NF4 base weights)"


def check_base(folder: Path) -> None:
    """Refuse a checkpoint that is already quantized: QLoRA quantizes a full-precision base itself."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quantization = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise InputError(f"{folder}/config.json: this checkpoint is already quantized ({method}); --qlora quantizes "
                         "the base itself and needs the full-precision (bf16/fp32) checkpoint")


def compute_dtype(requested: torch.dtype, device: torch.device) -> torch.dtype:
    """bf16 where the device has it; fp32 on a CUDA GPU without bf16 (pre-Ampere)."""
    if requested == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float32
    return requested


def load_quantized(folder: Path, dtype: torch.dtype, device: torch.device) -> Model:
    """The checkpoint in `folder` with the base's linear layers in NF4 (frozen), quantized as they are read: one weight
    at a time comes off the file in `dtype`, is quantized and dropped, so loading never holds the full-precision
    linear layers (its peak is the 4-bit model plus one weight). peft then wraps the `Linear4bit`s with its 4-bit
    LoRA layers (`is_loaded_in_4bit`)."""
    need("bitsandbytes", FEATURE)
    with torch.device("meta"):
        meta = Model(SmolVLMConfig.from_pretrained(folder))
    linears = [name for part in QUANTIZED_PARTS for name, module in meta.model.get_submodule(part).named_modules(
        prefix=f"model.{part}") if type(module) is nn.Linear]
    model = Model.from_pretrained(folder, dtype=dtype, device=device, defer=frozenset(f"{n}.weight" for n in linears))
    files = read_shapes(weight_files(folder))  # key -> (file, shape)
    for name in linears:
        linear = model.get_submodule(name)
        # Its file is mapped for this weight only, so the bf16 pages are released with it (a mapping kept open
        # for the whole load would keep every weight read resident).
        linear.weight = nn.Parameter(read_tensor(files[f"{name}.weight"][0], f"{name}.weight", dtype, device))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, quantize_linear(linear, dtype))
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True
    return model


def quantize_linears(root: nn.Module, dtype: torch.dtype) -> None:
    """Every `nn.Linear` under `root` -> an NF4 `Linear4bit` computing in `dtype`, frozen (in place)."""
    for name, linear in list(root.named_modules()):
        if type(linear) is nn.Linear:
            parent, _, leaf = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, leaf, quantize_linear(linear, dtype))


def quantize_linear(linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    """The NF4 `Linear4bit` (computing in `dtype`, frozen) holding `linear`'s weight, on its device."""
    bnb = need("bitsandbytes", FEATURE)
    padding = -linear.in_features % BLOCK
    kind = padded_linear4bit() if padding else bnb.nn.Linear4bit
    q = kind(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype,
             compress_statistics=True, quant_type="nf4", device=torch.device("meta"))
    q.weight = bnb.nn.Params4bit(F.pad(linear.weight.data, (0, padding)), requires_grad=False,
                                 compress_statistics=True, quant_type="nf4", blocksize=BLOCK)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    # Not the CPU inference repacking bnb does on the first eval-mode no-grad forward: it rewrites the weight into a
    # layout only its no-autograd gemv reads, which would break training after an eval pass.
    q.support_avx512bf16_for_cpu = False
    return q.to(linear.weight.device)  # quantizes the weight (Params4bit quantizes when moved to a device)


def dequantized(model: Model) -> Model:
    """The same model with every `Linear4bit` back to an `nn.Linear` holding its dequantized weight (in place)."""
    bnb = need("bitsandbytes", FEATURE)
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            weight = weight[:, : module.in_features]  # [out, in] without PaddedLinear4bit's zero columns
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=weight.device, dtype=model.dtype)
            linear.weight.data.copy_(weight)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.data)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, linear)
    model.is_loaded_in_4bit = False
    return model


@functools.cache
def padded_linear4bit():
    """A bnb `Linear4bit` whose weight [out, in + pad] has zero columns up to a whole block; its input gets as many
    zeros, so x @ W^T is unchanged. (bitsandbytes 0.50's CPU dequantize kernel is wrong for rows that end mid-block.)"""
    bnb = need("bitsandbytes", FEATURE)

    class PaddedLinear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
            return super().forward(F.pad(x, (0, -self.in_features % BLOCK)))

    return PaddedLinear4bit
