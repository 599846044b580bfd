"""Small building blocks shared by the blocks: RMSNorm, gated RMSNorm, SwiGLU MLP, short causal conv."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.parallel.tensor_parallel import column_linear, row_linear


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """Output norm of the linear mixers: RMSNorm(o) * silu(gate), per head (normalised over the last dim)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x).float() * F.silu(gate.float())
        return y.to(x.dtype)


def swiglu_hidden_size(d_model: int, mlp_ratio: float) -> int:
    """mlp_ratio * 2/3 * d_model rounded up to a multiple of 32 (keeps SwiGLU's parameters ~ a GELU MLP's)."""
    hidden = int(math.ceil(mlp_ratio * 2.0 / 3.0 * d_model))
    return max(32, 32 * int(math.ceil(hidden / 32)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); under tensor parallelism gate/up are column- and down row-parallel
    (each rank holds hidden / tp of the hidden units)."""

    def __init__(self, d_model: int, hidden: int, tp_group=None):
        super().__init__()
        self.gate_proj = column_linear(d_model, hidden, tp_group)
        self.up_proj = column_linear(d_model, hidden, tp_group)
        self.down_proj = row_linear(hidden, d_model, tp_group)
        self.down_proj.is_output_projection = True  # scaled init, see HybridLM._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ShortConv(nn.Module):
    """Causal depthwise conv over time on [B, T, C], kernel `kernel_size`, no bias, optional SiLU.

    `prefix` ([B, kernel_size-1, C]) supplies the inputs before the first position: the cached tail
    when decoding, or the previous CP rank's last positions (halo). Without it zeros are used. The
    conv then runs "valid" over prefix + x. Returns (y [B, T, C], the last kernel_size-1 inputs of
    prefix + x, i.e. the tail to cache).

    `position_in_document` ([B, T], packed documents): a tap reaching j positions back is dropped
    where the token has fewer than j tokens of its own document before it, so no document sees the
    end of the previous one (the prefix included)."""

    def __init__(self, channels: int, kernel_size: int, activation: bool = True):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"model.conv_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # Conv1d's default init

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None,
                position_in_document: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        K = self.kernel_size
        if prefix is None:
            prefix = x.new_zeros(B, K - 1, C)
        elif tuple(prefix.shape) != (B, K - 1, C):
            raise ValueError(f"conv prefix must be [B, conv_size-1, C] = {[B, K - 1, C]}, got {list(prefix.shape)}")
        xcat = torch.cat([prefix.to(x.dtype), x], dim=1)
        w = self.weight.to(x.dtype)
        if position_in_document is None:
            y = F.conv1d(xcat.transpose(1, 2), w, groups=C).transpose(1, 2)
        else:  # tap i multiplies x at lag K-1-i: keep it only inside the token's document
            y = xcat[:, K - 1:] * w[:, 0, K - 1]
            for i in range(K - 1):
                keep = (position_in_document >= K - 1 - i).to(x.dtype)[..., None]
                y = y + xcat[:, i:i + T] * w[:, 0, i] * keep
        if self.activation:
            y = F.silu(y)
        return y, xcat[:, xcat.shape[1] - (K - 1):]


def run_short_conv(conv: ShortConv, x: torch.Tensor, cache: dict | None, name: str, cp_group=None,
                   docs=None) -> torch.Tensor:
    """Runs `conv` on x [B, T, C] with the right prefix: the tail cached under `name` when decoding
    (and stores the new tail there), else the previous CP rank's last inputs when cp_group is set,
    else zeros. `docs` (lctrain.models.documents.Documents): taps stay inside each token's document."""
    pos = None if docs is None else docs.position_in_document()
    if cache is not None:
        y, tail = conv(x, cache.get(name))
        cache[name] = tail.detach()
        return y
    if cp_group is not None and conv.kernel_size > 1:
        from lctrain.parallel.halo import prepend_halo

        xh = prepend_halo(x, conv.kernel_size - 1, cp_group, dim=1)
        return conv(x, xh[:, : conv.kernel_size - 1], pos)[0]
    return conv(x, None, pos)[0]
