"""Connector: pixel shuffle (space-to-depth over patch blocks), then a bias-free linear projection."""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """[N, n*n, D] -> [N, (n/s)^2, D*s*s].

    Output token (i, j) concatenates the s x s block of patches at rows i*s.., cols j*s.. read row by row:
    Y[b, i*m + j, (a*s + c)*D + d] = X[b, (i*s + a)*n + (j*s + c), d], with m = n / s (the reference's ordering).
    """
    b, L, d = x.shape
    n = int(L**0.5)
    m = n // s
    x = x.view(b, m, s, m, s, d)  # [N, i, a, j, c, D]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, m * m, s * s * d)  # [N, (i, j), (a, c, D)]


class ModalityProjection(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Connector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, scale_factor: int):
        super().__init__()
        self.scale_factor = scale_factor
        self.modality_projection = ModalityProjection(vision_hidden * scale_factor**2, text_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection(pixel_shuffle(x, self.scale_factor))  # [N, N_img, D_t]
