"""SigLIP vision encoder with NaViT-style position ids (the Idefics3/SmolVLM variant).

Frames arrive as one batch [N, 3, H, W] with a patch mask [N, H/P, W/P] (True = the patch holds image pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from . import kernels
from .text import additive_mask, embedding


def patch_position_ids(patch_mask: torch.Tensor, n: int) -> torch.Tensor:
    """[N, h*w] position ids into the n x n embedding table for patch masks [N, h, w].

    The valid (top-left) region of each frame is stretched over the whole table by bucketizing fractional coordinates,
    with the reference's float32 arithmetic so odd grids give the same ids. Padded patches get id 0.
    """
    b, h, w = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / n, 1.0, 1 / n, device=device)
    nb_h = patch_mask[:, :, 0].sum(dim=1)  # [N] valid rows
    nb_w = patch_mask[:, 0, :].sum(dim=1)  # [N] valid columns
    frac_h = torch.arange(h, device=device, dtype=torch.float32)[None, :] * (1.0 / nb_h)[:, None]
    frac_w = torch.arange(w, device=device, dtype=torch.float32)[None, :] * (1.0 / nb_w)[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)  # [N, h]
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)  # [N, w]
    pos = (bucket_h[:, :, None] * n + bucket_w[:, None, :]).reshape(b, h * w)
    return torch.where(patch_mask.reshape(b, h * w), pos, 0)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.n = config.patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, padding="valid"
        )
        self.position_embedding = embedding(self.n**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [N, h*w, D], row-major patches
        return x + self.position_embedding(patch_position_ids(patch_mask, self.n))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.use_kernels = False  # the C++ kernels' attention, once fused for inference where they run

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, L, _ = x.shape
        if self.use_kernels:  # reads the heads in place: no transposes
            out = kernels.vision_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), mask, self.n_heads)
            return self.out_proj(out)
        shape = (b, L, self.n_heads, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # bidirectional
        return self.out_proj(out.transpose(1, 2).reshape(b, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.fc1_gelu = None  # fc1 with its GELU inside the matmul once fused for inference (Model.fuse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc1_gelu is not None:
            return self.fc2(self.fc1_gelu(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


@dataclass
class VisionPass:
    """A vision-tower pass in progress over N frames, after `done` encoder layers: what carries the pass from one
    slice of layers to the next (the engine spreads a tile's layers over several steps)."""

    x: torch.Tensor  # [N, L, D] the residual stream
    mask: torch.Tensor | None  # [N, 1, 1, L] additive key mask; None when no patch is padding
    normed: torch.Tensor | None  # [N, L, D] the next LayerNorm of x: the fused path computes it with the residual add
    done: int = 0


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.use_kernels = False  # the C++ kernels' residual-add + LayerNorm, once fused where they run

    def run(self, state: VisionPass, n: int, final_norm: nn.LayerNorm) -> VisionPass:
        """Run the next n layers of `state` in place (the fused path ends the last one with final_norm)."""
        stop = min(state.done + n, len(self.layers))
        x, normed, mask = state.x, state.normed, state.mask
        for i in range(state.done, stop):
            layer = self.layers[i]
            if normed is None:
                x = layer(x, mask)
                continue
            # The same layer with each residual add done in one pass with the LayerNorm that follows it.
            x, normed = kernels.add_layer_norm(x, layer.self_attn(normed, mask), layer.layer_norm2)
            after = self.layers[i + 1].layer_norm1 if i + 1 < len(self.layers) else final_norm
            x, normed = kernels.add_layer_norm(x, layer.mlp(normed), after)
        state.x, state.normed, state.done = x, normed, stop
        return state


class VisionTransformer(nn.Module):
    """`forward` is one pass; `begin`, `run` and `end` are the same pass in slices of layers (the same math, so the
    same bits)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def n_layers(self) -> int:
        return len(self.encoder.layers)

    def begin(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> VisionPass:
        """The pass over frames [N, 3, H, W] with patch mask [N, h, w], before its first layer."""
        x = self.embeddings(pixel_values, patch_mask)
        valid = patch_mask.flatten(1)  # [N, L]
        # As the reference: no mask at all unless some patch is padding; then padded keys are masked.
        mask = None if valid.all() else additive_mask(valid[:, None, None, :], x.dtype)  # [N, 1, 1, L]
        normed = self.encoder.layers[0].layer_norm1(x) if self.encoder.use_kernels else None
        return VisionPass(x, mask, normed)

    def run(self, state: VisionPass, n: int) -> VisionPass:
        """The next n encoder layers of the pass (fewer when fewer are left), in place."""
        return self.encoder.run(state, n, self.post_layernorm)

    def end(self, state: VisionPass) -> torch.Tensor:
        """[N, h*w, D] final-normed patch states of a pass whose layers have all run."""
        return self.post_layernorm(state.x) if state.normed is None else state.normed

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """[N, h*w, D] final-normed patch states for frames [N, 3, H, W] with patch mask [N, h, w]."""
        return self.end(self.run(self.begin(pixel_values, patch_mask), self.n_layers))
