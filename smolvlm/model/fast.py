"""Inference fast paths: fused projections, weights in the layout the CPU's kernels read fastest, int8.

`Model.fuse()` (and `Model.from_pretrained(..., fuse=True)`, which `smolvlm.load` uses) swaps HF-named `nn.Linear`
layers for `FastLinear`s, in place:

- Text decoder and lm_head (what batch-1 decoding reads every token): q/k/v become one `qkv_proj`, gate/up one
  `gate_up_proj`, and on the CPU every weight is reordered once into oneDNN's blocked layout. torch's `F.linear`
  re-lays a bf16 weight out on every call, which makes batch-1 decoding about twice as slow (mkldnn
  `_linear_pointwise` on a reordered weight is what torch.compile's CPU freezing pass emits).
- Vision tower and connector (large matmuls, compute-bound): on the CPU the same oneDNN call on the layer's own weight
  (no copy), with the bias, and for fc1 the tanh GELU, applied inside the matmul (`fc1_gelu`). Where the C++ kernels
  run, each residual add is one pass with the LayerNorm after it, fc1's GELU is a pass of theirs after oneDNN's
  matmul (oneDNN's fused GELU cost ~0.7x the matmul, theirs ~0.5x), and the tower's attention is theirs where it beats
  torch's CPU flash attention (`kernels.attention_beats_torch`).
- C++ kernels (smolvlm/model/kernels.py, CPUs with AVX512-BF16 and VNNI): the copied weights are instead packed in the
  kernels' layout, which both prefill matmuls and the one-call decode step (`Model.decode`) read.
- `quantize="int8"`: the text decoder's and lm_head's weights become int8 and read half the bytes of bf16. With the
  C++ kernels the weights have one symmetric scale per row and group of 32 input channels (llama.cpp's Q8_0; per-row
  scales lost ~5 points of top-1 agreement on real weights) and the products run in integers on activations quantized
  per group of 32 to int16 (15 bits; bf16-rounded activations were both less exact on average and slower: each weight
  had to be converted to float); elsewhere fbgemm's dynamic-quantized matmul (x86 CPUs) also quantizes each call's activations to 8 bits. The int8
  decoder's hidden states, norms and attention run in fp32 whatever the model's dtype: on a bf16 model, int8's weight
  error on top of bf16 rounding between the matmuls cost 1.4 points of top-1 agreement on real weights, and the
  activations are a few KB per token against the MBs of weights a step reads. Vision and connector keep the model's
  dtype.

The copies are made one layer at a time, so memory never holds two copies of the model; `from_pretrained` reads the
weights it copies through their own short-lived file mapping, so the checkpoint's pages don't stay resident beside them.
`Model.unfuse()` gives back the HF module tree (exactly; int8 weights come back dequantized), so training, LoRA and
`state_dict()` see the released checkpoint's names. A fused model is for inference only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..weights import reuse_large_frees
from . import kernels

QUANTIZE = ("int8",)

# Module class name -> [(attribute set when fused, the HF layers it replaces, copied?, activation)].
# Copied layers are concatenated and reordered (or quantized); the others keep their own weights (CPU only).
# An attribute that is not one of its parts is None in the unfused model (e.g. Attention.qkv_proj).
FUSIONS = {
    "Attention": [("qkv_proj", ("q_proj", "k_proj", "v_proj"), True, None), ("o_proj", ("o_proj",), True, None)],
    "MLP": [("gate_up_proj", ("gate_proj", "up_proj"), True, None), ("down_proj", ("down_proj",), True, None)],
    "Model": [("lm_head", ("lm_head",), True, None)],
    "VisionAttention": [(p, (p,), False, None) for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
    "VisionMLP": [("fc1_gelu", ("fc1",), False, "gelu_tanh"), ("fc2", ("fc2",), False, None)],
    "ModalityProjection": [("proj", ("proj",), False, None)],
}


class FastLinear(nn.Module):
    """One or more HF linear layers (`parts`: name -> (weight [N_i, K], bias or None)) as one inference-only matmul
    over their outputs concatenated.

    kind: "packed" / "packed_int8" (CPUs with AVX512-BF16: the C++ kernels' layout, smolvlm/model/kernels.py; int8 is
    weight-only with per-group scales), "reordered" (CPU: oneDNN blocked copy), "int8" (other x86 CPUs:
    fbgemm packed int8), "view" (CPU: oneDNN on the layer's own weight, one part), "dense" (F.linear on a concatenated
    copy). activation "gelu_tanh": GELU of the output.
    """

    def __init__(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]], kind: str, activation=None):
        super().__init__()
        weights = [w for w, _ in parts.values()]
        biases = [b for _, b in parts.values()]
        self.kind, self.activation = kind, activation
        self.sizes = {name: w.shape[0] for name, (w, _) in parts.items()}  # for unfuse
        self.dtype, self.device = weights[0].dtype, weights[0].device
        self.in_features, self.out_features = weights[0].shape[1], sum(self.sizes.values())
        with torch.no_grad():
            if kind == "view":
                (self.weight, self.bias), = parts.values()
                return
            weight = torch.cat(weights) if len(weights) > 1 else weights[0]  # [N, K]
            bias = None if biases[0] is None else torch.cat(biases) if len(biases) > 1 else biases[0]
            if kind == "int8":
                self.qweight = _pack_int8(weight.float(), None if bias is None else bias.float())
            elif kind == "packed":
                self.weight, self.scale, self.bias = kernels.pack(weight.detach()), weight.new_empty(0).float(), None
            elif kind == "packed_int8":
                q, scale = kernels.quantize_int8(weight.detach())
                self.weight, self.scale, self.bias = kernels.pack(q), kernels.pack_scales(scale), None
            elif kind == "reordered":
                self.weight, self.bias = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None), bias
            else:
                self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("packed", "packed_int8"):
            return kernels.linear(x, self.weight, self.scale, self.out_features)
        if self.kind in ("reordered", "view"):
            if self.activation and kernels.runs(x):  # the kernels' GELU pass costs ~0.5x the matmul, oneDNN's ~0.7x
                return kernels.gelu_tanh_(torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], ""))
            attr, algorithm = ("gelu", "tanh") if self.activation else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, [], algorithm)
        if self.kind == "int8":
            y = torch.ops.quantized.linear_dynamic(x.float(), self.qweight, False).to(x.dtype)
        else:
            y = F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if self.activation else y

    def unfuse(self) -> dict[str, nn.Linear]:
        """The HF linear layers this one replaced, by name (int8 weights come back dequantized)."""
        if self.kind == "int8":
            weight, bias = torch.ops.quantized.linear_unpack(self.qweight)
            weight, bias = weight.dequantize().to(self.dtype), None if bias is None else bias.to(self.dtype)
        else:
            weight, bias = self.weight, self.bias
            if self.kind == "reordered":
                weight = weight.to_dense()
            elif self.kind == "packed":
                weight = kernels.unpack(weight, self.out_features)
            elif self.kind == "packed_int8":
                weight = kernels.dequantize_int8(weight, self.scale, self.out_features).to(self.dtype)
        sizes = list(self.sizes.values())
        if len(sizes) == 1:  # the layer's own tensors (the same Parameters for "view")
            weights, biases = [weight], [bias]
        else:
            weights = [w.clone() for w in weight.split(sizes)]
            biases = [None] * len(sizes) if bias is None else [b.clone() for b in bias.split(sizes)]
        layers = {}
        for (name, n), w, b in zip(self.sizes.items(), weights, biases):
            layer = nn.Linear(self.in_features, n, bias=b is not None, device="meta")
            layer.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w)
            if b is not None:
                layer.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b)
            layers[name] = layer
        return layers

    def extra_repr(self) -> str:
        act = f", {self.activation}" if self.activation else ""
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{'+'.join(self.sizes)}: {self.in_features} -> {self.out_features}, {self.kind} {dtype}{act}"


def _onednn_ok(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _copied_kind(weight: torch.Tensor, biases: list, quantize: str | None) -> str:
    """How a copied (decoder or lm_head) layer runs: the C++ kernels where they run (they take no bias; the decoder
    has none), else fbgemm for int8, oneDNN, or a plain dense copy."""
    if all(b is None for b in biases) and kernels.usable(weight):
        return "packed_int8" if quantize else "packed"
    if quantize:
        return "int8"
    return "reordered" if _onednn_ok(weight.dtype, weight.device) else "dense"


def _pack_int8(weight: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed form of `weight` [N, K] (fp32) as int8 with symmetric per-output-channel scales."""
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()  # [N]
    zero = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch 2.13 deprecates the quantized dtypes that fbgemm's packing takes (pytorch#184982); the kernels stay.
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
        raise InputError(f"quantize={quantize!r} runs on the CPU only; got device {str(device)!r}")
    if kernels.load() is not None:
        return
    if torch.backends.quantized.engine not in ("x86", "fbgemm") or not hasattr(torch.ops.quantized, "linear_dynamic"):
        raise InputError(
            f"quantize={quantize!r} needs torch's fbgemm int8 kernels (x86 CPUs); this build's quantized engine is "
            f"{torch.backends.quantized.engine!r}"
        )


def copied_keys(model: nn.Module) -> set[str]:
    """Checkpoint keys of the weights `fuse` copies (their layers' weight and bias keys)."""
    keys = set()
    for prefix, module in model.named_modules():
        for _, parts, copied, _ in FUSIONS.get(type(module).__name__, []):
            for name in parts if copied else ():
                layer = getattr(module, name)
                if isinstance(layer, nn.Linear):
                    keys |= {f"{prefix}.{name}.{p}".lstrip(".") for p, _ in layer.named_parameters()}
    return keys


def fuse(model: nn.Module, quantize: str | None = None, read: Callable[[list[str]], dict] | None = None) -> None:
    """Swap `model`'s HF linear layers for FastLinears (see the module docstring), in place, one layer at a time.

    read: a function giving the tensors of checkpoint keys (in the model's dtype and device); copied layers are read
    through it instead of from their (then unloaded, meta) parameters.
    """
    for prefix, module in list(model.named_modules()):
        for attr, names, copied, activation in FUSIONS.get(type(module).__name__, []):
            layers = {name: getattr(module, name) for name in names}
            if not all(isinstance(layer, nn.Linear) for layer in layers.values()):
                continue  # already fused
            if read is not None and copied:
                keys = {name: f"{prefix}.{name}".lstrip(".") for name in names}
                tensors = read([f"{k}.{p}" for name, k in keys.items() for p, _ in layers[name].named_parameters()])
                parts = {name: (tensors[f"{k}.weight"], tensors.get(f"{k}.bias")) for name, k in keys.items()}
            else:
                parts = {name: (layer.weight, layer.bias) for name, layer in layers.items()}
            weight = parts[names[0]][0]
            if copied:
                kind = _copied_kind(weight, [b for _, b in parts.values()], quantize)
            elif _onednn_ok(weight.dtype, weight.device):
                kind = "view"
            else:
                continue  # keep the plain layer: nothing to gain without oneDNN
            fast = FastLinear(parts, kind, activation)
            del parts, layers
            for name in names:
                setattr(module, name, None)
            setattr(module, attr, fast)
        if hasattr(module, "use_kernels"):  # the vision tower's attention and norms: the C++ kernels where they run
            weight = next(module.parameters())
            module.use_kernels = kernels.runs(weight) and (
                type(module).__name__ != "VisionAttention" or kernels.attention_beats_torch(weight, module.head_dim))
    if quantize:  # an int8 decoder computes in fp32 (the module docstring): TextModel runs in its norms' dtype
        _text_norms(model, torch.float32)
    model.packed_decoder = decoder_weights(model)  # built once: ~1 ms of Python per token if built per step
    if next(model.parameters()).device.type == "cpu":
        reuse_large_frees()  # loading is over: an inference model's large temporaries are reused (its docstring)


def _text_norms(model: nn.Module, dtype: torch.dtype) -> None:
    for module in model.model.text_model.modules():
        if type(module).__name__ == "RMSNorm":
            module.to(dtype)


def unfuse(model: nn.Module) -> None:
    """Give back the HF linear layers, in place (inverse of `fuse`)."""
    for module in list(model.modules()):
        if hasattr(module, "use_kernels"):
            module.use_kernels = False
        for attr, fast in list(module.named_children()):
            if isinstance(fast, FastLinear):
                setattr(module, attr, None)
                for name, layer in fast.unfuse().items():
                    setattr(module, name, layer)
    if model.config.tie_word_embeddings:  # a fused lm_head held its own copy of the embedding matrix
        model.lm_head.weight = model.model.text_model.embed_tokens.weight
    _text_norms(model, model.model.text_model.embed_tokens.weight.dtype)  # back from an int8 model's fp32
    model.packed_decoder = None


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FastLinear) for m in model.modules())


def decoder_weights(model: nn.Module) -> list[torch.Tensor] | None:
    """The packed text decoder as the C++ decode step takes it (per layer: input norm, qkv weight and scale, o weight
    and scale, post-attention norm, gate_up and down weights and scales), or None unless every decoder projection and
    lm_head is packed."""
    text = model.model.text_model
    layers = [(layer.self_attn, layer.mlp) for layer in text.layers]
    linears = [model.lm_head]
    linears += [m for attn, mlp in layers for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    packed = all(isinstance(m, FastLinear) and m.kind in ("packed", "packed_int8") for m in linears)
    if not packed or text.config.head_dim % 16:
        return None
    weights = []
    for layer, (attn, mlp) in zip(text.layers, layers):
        for norm, projections in ((layer.input_layernorm, (attn.qkv_proj, attn.o_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_up_proj, mlp.down_proj))):
            weights += [norm.weight] + [t for p in projections for t in (p.weight, p.scale)]
    return weights
