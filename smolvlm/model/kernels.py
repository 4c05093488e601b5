"""The C++ CPU kernels of csrc/: packed matmuls, a whole text-decoder step in one call, and the vision tower's
attention and residual-add + LayerNorm.

Built on first use with torch's extension builder (a C++ compiler is needed; ~30 s once, then loaded from
~/.cache/smolvlm in well under a second) for CPUs with AVX512-BF16 and AVX512-VNNI, e.g. AMD Zen 4 and Intel Cooper
Lake or newer.
Anywhere else `load()` says None and the model keeps torch's oneDNN path (smolvlm/model/fast.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import cpp_build

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))  # and their common.h
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma", "-fopenmp",
         "-mamx-tile", "-mamx-bf16"]  # AMX: only run where the CPU has it (amx())
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}
DTYPES = (torch.bfloat16, torch.float32)


def cpu_supported() -> bool:
    """Whether this CPU runs the kernels (Linux x86-64 with AVX512-F/BW/VL, AVX512-BF16 and AVX512-VNNI)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return CPU_FLAGS <= set(flags)


@functools.cache
def load():
    """The compiled extension module, or None where the CPU or the build can't run it (logged once)."""
    if os.environ.get("SMOLVLM_KERNELS", "1") == "0" or not cpu_supported():
        return None
    # One build folder per source folder: two checkouts sharing one would rebuild at every switch.
    where = hashlib.sha1(str(SOURCES[0].parent).encode()).hexdigest()[:10]
    start = time.perf_counter()
    try:
        module = cpp_build.build("smolvlm_kernels", SOURCES, f"kernels-{where}", FLAGS, ["-fopenmp"],
                                 what="CPU kernels", note="~30 s")
    # No compiler or ninja, an unwritable cache folder, or a compiler without these intrinsics: torch's kernels work.
    except Exception as e:
        lines = str(e).splitlines() or [type(e).__name__]
        reason = next((line for line in lines if "error" in line.lower() and "Error building" not in line), lines[0])
        log.warning("smolvlm: C++ CPU kernels unavailable, using torch's kernels (%s)", reason.strip()[:300])
        return None
    module.set_amx(amx())
    log.info("smolvlm: C++ CPU kernels ready in %.1f s%s", time.perf_counter() - start, ", AMX" if amx() else "")
    return module


@functools.cache
def amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids or newer) and this process may use them (asked of
    Linux once): the kernels' bf16 matmuls run on them (csrc/amx.cpp), and so do torch's CPU flash attention and
    oneDNN's bf16 matmuls."""
    return torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()


def attention_beats_torch(weight: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernels' vision attention is faster than torch's CPU flash attention for a tower of this dtype and
    head size: everywhere without AMX (about twice torch's in bf16 on Zen 4). With AMX torch runs its products on the
    tiles, and so do the kernels in bf16 with heads of 32 or 64 dims (csrc/amx.cpp; 4 frames of 1024 patches, 12
    heads, 2 threads: 14.7 vs 19.2 ms); otherwise torch's is faster there (fp32: 16.1 vs 20.3 ms a frame)."""
    return not amx() or (weight.dtype == torch.bfloat16 and head_dim in (32, 64))


def runs(tensor: torch.Tensor) -> bool:
    """Whether the kernels run here on tensors like this one (CPU, bf16 or fp32)."""
    return tensor.device.type == "cpu" and tensor.dtype in DTYPES and load() is not None


def usable(weight: torch.Tensor) -> bool:
    """Whether a [N, K] weight can be packed for the kernels here."""
    return runs(weight) and weight.shape[1] % 2 == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the kernels' layout (zero rows pad N to a multiple of 16): bf16 and int8 [N/16, K/2, 16, 2], fp32
    [N/16, K, 16]."""
    n, k = weight.shape
    blocks = -(-n // 16)
    if blocks * 16 != n:
        weight = torch.cat([weight, weight.new_zeros(blocks * 16 - n, k)])
    if weight.dtype == torch.float32:
        return weight.view(blocks, 16, k).permute(0, 2, 1).contiguous()
    return weight.view(blocks, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack`: the [n, K] weight."""
    if packed.dim() == 3:  # fp32
        blocks, k = packed.shape[:2]
        return packed.permute(0, 2, 1).reshape(blocks * 16, k)[:n].contiguous()
    blocks, k2 = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(blocks * 16, 2 * k2)[:n].contiguous()


GROUP = 32  # int8: input channels per scale (csrc/common.h's GROUP)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row and group of GROUP input channels (llama.cpp's Q8_0): (q [N, K] int8,
    scale [N, ceil(K / GROUP)] fp32) with weight ~= q * scale repeated GROUP times along K. Per-row scales lost
    ~5 points of top-1 agreement with fp32 on real SmolLM2 weights, whose rows have outlier channels.
    Done in blocks of rows, so an fp32 copy of a whole large matrix (lm_head: 113 MB) never exists."""
    n, k = weight.shape
    groups = -(-k // GROUP)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, groups, dtype=torch.float32, device=weight.device)
    for start in range(0, n, 4096):
        rows = slice(start, start + 4096)
        w = F.pad(weight[rows].float(), (0, groups * GROUP - k)).view(-1, groups, GROUP)
        scale[rows] = s = (w.abs().amax(dim=2) / 127).clamp(min=1e-12)
        q[rows] = torch.round(w / s[..., None]).clamp(-127, 127).to(torch.int8).view(-1, groups * GROUP)[:, :k]
    return q, scale


def pack_scales(scale: torch.Tensor) -> torch.Tensor:
    """Group scales [N, G] -> the kernels' [N/16, G, 16] (zero scales pad N to a multiple of 16)."""
    n, groups = scale.shape
    blocks = -(-n // 16)
    scale = F.pad(scale, (0, 0, 0, blocks * 16 - n))
    return scale.view(blocks, 16, groups).transpose(1, 2).contiguous()


def dequantize_int8(packed: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """The fp32 [n, K] weight of an int8 weight packed by `pack` with its `pack_scales` scales."""
    q = unpack(packed, n).float()
    per_row = scale.transpose(1, 2).reshape(-1, scale.shape[1])[:n]  # [n, G]
    return q * per_row.repeat_interleave(GROUP, dim=1)[:, : q.shape[1]]


def linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., n] (x's dtype) with W packed by `pack`. int8 W: `scale` its `pack_scales` group
    scales, and the products run on x quantized per row and group of GROUP to int16; else `scale` is empty."""
    y = load().linear(x.reshape(-1, x.shape[-1]).contiguous(), packed, scale, n)
    return y.view(*x.shape[:-1], n)


def build() -> None:
    """Build (or find) the kernels now and say how it went; scripts/setup.sh runs this so that a first load doesn't
    wait for the compiler."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not cpu_supported():
        print("smolvlm: this CPU has no AVX512-BF16 (or isn't Linux x86-64); fused models use torch's kernels")
    load()


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, heads: int):
    """Bidirectional attention of q, k, v [B, L, heads * Dh] (projection outputs; no head transposes) under an
    additive key mask broadcastable to [B, 1, 1, L] (or None) -> [B, L, heads * Dh]."""
    b, length, _ = q.shape
    mask = q.new_empty(0, dtype=torch.float32) if mask is None else mask.reshape(b, length).float().contiguous()
    return load().vision_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, heads)


def gelu_tanh_(y: torch.Tensor) -> torch.Tensor:
    """y = GELU(y) (tanh approximation) in place, with torch's CPU kernel's operations in its order; returns y."""
    load().gelu_tanh_(y)
    return y


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2 I] = [gate | up], each op rounded as torch's: the decode step's
    arithmetic, so that a prefilled token's MLP has its decoded bits."""
    return load().silu_mul(gate_up.contiguous())


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y)) in one pass: a residual add and the LayerNorm after it."""
    return tuple(load().add_layer_norm(x.contiguous(), y.contiguous(), norm.weight, norm.bias, norm.eps))


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, H, T, Dh] over fp32 cache rows k, v [B, H_kv, S, Dh]: query (b, t) attends keys
    0..positions[b, t] of row b, exactly as the decode step attends -> [B, T, H * Dh] in q's dtype."""
    return load().cached_attention(q.contiguous(), k, v, positions.contiguous())
