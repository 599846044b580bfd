"""Reference of the causal depthwise short conv: one tap at a time, float32 accumulation.

y[b, t, c] = act( sum_{i < K} w[c, i] * xcat[b, t + i, c] ),  xcat = prefix ++ x  (prefix: the K-1
inputs before position 0; zeros when absent), act = SiLU or identity."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, prefix: torch.Tensor | None = None,
                        activation: bool = True) -> torch.Tensor:
    """x [B, T, C], weight [C, K], prefix [B, K-1, C] or None -> y [B, T, C] in x's dtype."""
    B, T, C = x.shape
    K = weight.shape[-1]
    if prefix is None:
        prefix = x.new_zeros(B, K - 1, C)
    xcat = torch.cat([prefix.to(x.dtype), x], dim=1).float()
    w = weight.float()
    y = sum(xcat[:, i:i + T] * w[:, i] for i in range(K))
    return (F.silu(y) if activation else y).to(x.dtype)
