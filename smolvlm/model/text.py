"""SmolLM2 (Llama) decoder: RMSNorm, rotate-half RoPE, grouped-query attention over an optional KV cache, SiLU MLP.

Module and parameter names are the HF ones (`embed_tokens`, `layers.{i}.self_attn.q_proj`, ...), so the state dict
is the released checkpoint format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from . import kernels
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As the reference: normalize in fp32, cast back to the input dtype, *then* scale by the weight. F.rms_norm
        # upcasts internally and rounds once, bit-identical to the reference's five ops, in one.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """An nn.Embedding left uninitialized: its weight always comes from the checkpoint, and nn.Embedding's random
    init on the meta device (where models are built) runs torch's Python meta kernels, whose first use imports ~800
    modules: about a second and 70 MB of memory at every load."""
    return nn.Embedding(num, dim, padding_idx=padding_idx, _weight=torch.empty(num, dim))


def rope_inv_freq(theta: float, head_dim: int, device=None) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies, computed in fp32 exactly as the reference."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


class RotaryEmbedding(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.theta, self.head_dim = config.rope_theta, config.head_dim
        # Computed, never loaded (non-persistent, as in the reference); Model.from_pretrained recomputes it after
        # building the module on the meta device. Computed on the CPU even there (see `embedding`: pow is another op
        # whose meta kernel is Python).
        self.register_buffer("inv_freq", rope_inv_freq(self.theta, self.head_dim, device="cpu"), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, Dh/2], fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `allowed`, else the dtype's most negative value, like the reference's eager masks: a query with no
    allowed key then attends uniformly instead of producing NaN."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, Dh] -> cos and sign-folded sin [B, 1, T, Dh] for `apply_rope`, made once per forward."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, Dh] rotated with the tables of `rope_tables`. The reference's rotate_half(x) * sin is
    cat(-x2, x1) * sin = roll(x, Dh/2) * cat(-sin1, sin2), bit for bit (a sign flip is exact), in fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def masked_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA of q [B, H, T, Dh] over k, v [B, H_kv, S, Dh] (query head i reads key head i // (H / H_kv)) under the
    additive mask [B or 1, 1, T, S], without SDPA's enable_gqa: CUDA's memory-efficient kernel takes masks but not
    GQA, so a masked enable_gqa call runs the math kernel, whose [B, H, T, S] scores a 4k-token video prompt makes
    hundreds of MB a layer. Decoding (T = 1) folds each key head's H / H_kv query heads into query rows (no copies);
    longer queries read the key heads repeated, as the reference's SDPA path does. [B, H, T, Dh]."""
    b, h, t, d = q.shape
    g = h // k.shape[1]
    if t == 1:
        out = F.scaled_dot_product_attention(q.reshape(b, h // g, g, d), k, v, attn_mask=mask.expand(-1, -1, g, -1))
        return out.reshape(b, h, 1, d)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.qkv_proj = None  # q/k/v as one FastLinear once fused for inference (Model.fuse)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, cache_positions):
        """x [B, T, D]; cos, sin: the RoPE tables of `rope_tables`; mask: additive [B, 1, T, S], or None: causal (over
        cache positions with a cache: then by the C++ kernels)."""
        b, t, _ = x.shape
        h, h_kv = self.n_heads, self.n_kv_heads
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(b, t, h + 2 * h_kv, self.head_dim).transpose(1, 2)  # [B, H + 2 H_kv, T, Dh]
            qk = apply_rope(qkv[:, : h + h_kv], cos, sin)  # q and k heads rotated together
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + h_kv :]
        else:
            q = apply_rope(self.q_proj(x).view(b, t, h, self.head_dim).transpose(1, 2), cos, sin)  # [B, H, T, Dh]
            k = apply_rope(self.k_proj(x).view(b, t, h_kv, self.head_dim).transpose(1, 2), cos, sin)  # [B, H_kv, T, Dh]
            v = self.v_proj(x).view(b, t, h_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v, cache_positions)  # [B, H_kv, max_len, Dh]
            if mask is None:  # the C++ kernels, causal over cache positions (TextModel.forward)
                out = kernels.cached_attention(q.contiguous(), k, v, cache_positions)  # [B, T, H * Dh]
                return self.o_proj(out)
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]  # the S attended positions
        # Attention runs in the cache's dtype: an fp32 cache on the CPU (the engine's choice) makes batch-1 decoding
        # attention ~9x faster than torch's bf16 CPU kernels, on the same bf16-rounded keys and values.
        if q.is_cuda and mask is not None:
            out = masked_gqa(q.to(k.dtype), k, v, mask).to(x.dtype)
        else:
            out = F.scaled_dot_product_attention(
                q.to(k.dtype), k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            ).to(x.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj = None  # gate/up as one FastLinear once fused for inference (Model.fuse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)  # [..., 2 I]
            if kernels.runs(gate_up):  # the decode step's activation (the same bits), in one pass
                return self.down_proj(kernels.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, cache_positions):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        pad = pad if pad is not None and pad < config.vocab_size else None  # padding_idx only affects gradients
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # The C++ kernels' attention for causal steps over an fp32 cache, once fused for inference where they run: each
        # query attends its own keys 0..position, in an order the batch and its padding don't change.
        self.use_kernels = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, D] for `inputs_embeds` [B, T, D] at RoPE positions `position_ids` [B, T].

        attn_mask: bool, broadcastable to [B, 1, T, S], True = may attend. None without a cache: plain causal.
        None with a cache: causal over cache positions (key j visible to a query written at position p iff j <= p).
        cache, cache_positions [B, T]: write this step's keys/values into cache rows 0..B-1 at those positions and
        attend to positions 0..S-1 of those rows.
        """
        dtype = inputs_embeds.dtype
        if cache is not None:
            if cache_positions is None:
                raise ValueError("text_model: cache_positions [B, T] is required with a cache")
            if attn_mask is None and not (self.use_kernels and cache.k.dtype == torch.float32):
                keys = torch.arange(cache.max_len, device=cache_positions.device)
                attn_mask = keys <= cache_positions[:, None, :, None]  # [B, 1, T, max_len]
        attn_dtype = dtype if cache is None else cache.k.dtype  # attention runs in the cache's dtype
        mask = None if attn_mask is None else additive_mask(attn_mask, attn_dtype)  # pad-only rows must not give NaN
        cos, sin = rope_tables(*self.rotary_emb(position_ids, dtype))
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, cache_positions)
        return self.norm(h)
