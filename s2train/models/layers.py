"""The transformer layers that the codec (``codec.py``) and the Dual-AR model (``dual_ar.py``) share.

Shape legend: B batch, T positions, H heads, Dh head dim, C channels (model dim), I SwiGLU hidden size.

Numerics follow the release: RMSNorm in float32, cast back, then times the weight; RoPE angles in
float32, the cos/sin table rounded through ``table_dtype`` (bfloat16 in the release, even for a float32
model) and applied in float32 to interleaved pairs (2i, 2i+1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, times the weight. (..., C) -> (..., C)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). (..., C) -> (..., C); the names w1, w3, w2 are the release's."""

    def __init__(self, dim: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(dim, intermediate, bias=False)
        self.w3 = nn.Linear(dim, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_cos_sin(
    positions: Tensor, head_dim: int, base: float, table_dtype: torch.dtype = torch.bfloat16
) -> tuple[Tensor, Tensor]:
    """cos and sin (..., Dh/2), float32, of integer positions (...), rounded through ``table_dtype``.

    Frequency i is base ** (-2i / Dh); angle = position * frequency, all in float32. The release stores
    the table in bfloat16, so its rows are cos/sin rounded to bfloat16 even when the model runs in float32.
    """
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * freqs  # (..., Dh/2)
    return angles.cos().to(table_dtype).float(), angles.sin().to(table_dtype).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x (B, T, H, Dh) by cos, sin (T or (B or 1, T), Dh/2), in
    float32; the result has x's dtype."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, Dh/2) each
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., T, 1, Dh/2): broadcast over the heads
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)
