"""Rotary position embedding with the context-extension scalings of `model.rope`.

Plain RoPE (head dim d, pairs i = 0 .. d/2-1): theta_i = base^(-2i/d); position p rotates pair i by
the angle p * theta_i. Pairs are the two halves of the head dim (x[:d/2], x[d/2:]), as in GPT-NeoX/Llama.

Scalings, with s = rope.factor and L = the original context length (rope.original_max_position, or
the `max_position` the model was built with when that is 0):
- none:   theta_i unchanged.
- linear: position interpolation, angle = (p / s) * theta_i, i.e. theta_i / s.
- ntk:    NTK-aware base change, base' = base * s^(d / (d - 2)); the lowest frequency is stretched by s
          and the highest is untouched.
- yarn:   "NTK-by-parts": with r_i = L * theta_i / (2 pi) (turns of pair i over L) and the ramp
          gamma_i = clamp((r_i - alpha) / (beta - alpha), 0, 1), alpha = 1, beta = 32,
          theta'_i = (1 - gamma_i) * theta_i / s + gamma_i * theta_i (slow pairs interpolate, fast pairs
          keep theta). Attention temperature: cos/sin are multiplied by m = 0.1 ln(s) + 1, so q.k logits
          grow by m^2 (YaRN's sqrt(1/t) = 0.1 ln(s) + 1).
"""
from __future__ import annotations

import math

import torch
from torch import nn

YARN_ALPHA = 1.0
YARN_BETA = 32.0


def rope_inv_freq(head_dim: int, base: float = 10000.0, scaling: str = "none", factor: float = 1.0,
                  original_max_position: int = 0) -> tuple[torch.Tensor, float]:
    """(theta [head_dim/2] float64, attention magnitude m) for the given scaling (see module doc)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim (model.attn_head_dim), got {head_dim}")
    if scaling != "none" and factor < 1.0:
        raise ValueError(f"model.rope.factor must be >= 1 for scaling={scaling!r}, got {factor}")
    d = head_dim
    idx = torch.arange(0, d, 2, dtype=torch.float64)
    theta = base ** (-idx / d)
    if scaling == "none":
        return theta, 1.0
    if scaling == "linear":
        return theta / factor, 1.0
    if scaling == "ntk":
        new_base = base * factor ** (d / (d - 2)) if d > 2 else base * factor
        return new_base ** (-idx / d), 1.0
    if scaling == "yarn":
        if original_max_position <= 0:
            raise ValueError("YaRN needs the original context length: set model.rope.original_max_position "
                             "(or build the model with max_position=<training seq_len>)")
        turns = original_max_position * theta / (2 * math.pi)
        gamma = ((turns - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
        new_theta = (1 - gamma) * theta / factor + gamma * theta
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0
        return new_theta, mscale
    raise ValueError(f"unknown model.rope.scaling {scaling!r}; use none, linear, ntk or yarn")


class RotaryEmbedding(nn.Module):
    """Applies RoPE at explicit (global) positions. Angles are computed in float64 on the fly, so
    positions of 100K+ tokens keep their precision; no table of max length is kept."""

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: str = "none", factor: float = 1.0,
                 original_max_position: int = 0):
        super().__init__()
        theta, mscale = rope_inv_freq(head_dim, base, scaling, factor, original_max_position)
        self.register_buffer("inv_freq", theta.float(), persistent=False)
        self._theta64 = theta
        self.mscale = mscale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] (already times mscale) for integer positions [T]."""
        theta = self._theta64.to(positions.device)
        angles = positions.to(torch.float64)[:, None] * theta[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * self.mscale).to(dtype), (angles.sin() * self.mscale).to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] rotated at positions [T]."""
        cos, sin = self.cos_sin(positions, torch.float32)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)
