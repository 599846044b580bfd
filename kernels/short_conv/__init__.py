"""Causal depthwise short conv (the 4-tap conv before the linear mixers' kernels), with optional SiLU.

``causal_conv1d(x, weight, prefix=None, activation=True, backend="auto")`` on x [B, T, C] (channels
last, the projections' own layout), weight [C, K], prefix [B, K-1, C] (the inputs before position 0:
a decoding cache's tail or the previous CP rank's halo; zeros when None). Backends: ``triton`` (fused
kernels, float32 accumulation, keeps only x for the backward; up to 4 taps), ``torch`` (F.conv1d on
the transposed layout), ``naive`` (tap by tap, the reference); ``auto`` = triton on CUDA (for up to
4 taps), else torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import naive_causal_conv1d

MAX_TAPS = 4  # the Triton kernels' limit (kernels/short_conv/triton.py keeps one dw accumulator per tap)

BACKENDS = ("auto", "naive", "torch", "triton")


def _torch_conv(x, weight, prefix, activation):
    B, T, C = x.shape
    K = weight.shape[-1]
    if prefix is None:
        prefix = x.new_zeros(B, K - 1, C)
    xcat = torch.cat([prefix.to(x.dtype), x], dim=1)
    y = F.conv1d(xcat.transpose(1, 2), weight.to(x.dtype)[:, None, :], groups=C).transpose(1, 2)
    return F.silu(y) if activation else y


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, prefix: torch.Tensor | None = None,
                  activation: bool = True, backend: str = "auto") -> torch.Tensor:
    """y [B, T, C] in x's dtype (module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"causal_conv1d: unknown backend {backend!r}; use one of {BACKENDS}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"causal_conv1d: x must be [B, T, C] and weight [C, K]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    K = weight.shape[-1]
    if prefix is not None and tuple(prefix.shape) != (x.shape[0], K - 1, x.shape[-1]):
        raise ValueError(f"causal_conv1d: prefix must be [B, K-1, C] = {[x.shape[0], K - 1, x.shape[-1]]}, got "
                         f"{list(prefix.shape)}")
    if backend == "auto":
        backend = "triton" if x.is_cuda and K <= MAX_TAPS else "torch"
    if backend == "triton" and K > MAX_TAPS:
        raise ValueError(f"causal_conv1d: the Triton kernel takes at most {MAX_TAPS} taps, got {K} "
                         "(model.conv_size); use backend auto or torch (model.kernel_backend=auto runs F.conv1d then)")
    if backend == "naive":
        return naive_causal_conv1d(x, weight, prefix, activation)
    if backend == "torch":
        return _torch_conv(x, weight, prefix, activation)
    from .triton import triton_causal_conv1d

    return triton_causal_conv1d(x, weight, prefix, activation)


__all__ = ["causal_conv1d", "naive_causal_conv1d", "BACKENDS"]
