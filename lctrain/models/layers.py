"""Small building blocks shared by the blocks: RMSNorm, gated RMSNorm, SwiGLU MLP, short causal conv."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lctrain.kernels.short_conv import causal_conv1d
from lctrain.kernels.swiglu import swiglu
from lctrain.models.fused import compiled, rms_norm_math, swiglu_math, use_triton
from lctrain.parallel.tensor_parallel import column_linear, row_linear


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, t.shape[-1]).contiguous()


class _RMSNormFn(torch.autograd.Function):
    """(gated) RMSNorm that keeps only x, the gate and one float32 rstd per row for the backward.

    Autograd through the float32 formula keeps two float32 copies of x (and, gated, two of the gate):
    16 (gated: 32) bytes per channel and token against 2-4 here in bf16, the largest saving per token
    of a block after the MLP's (docs/long_context.md). Same outputs; gradients equal up to rounding.
    On CUDA one Triton kernel each way (kernels/rms_norm) computes the same formula."""

    @staticmethod
    def forward(ctx, x, weight, gate, eps):
        if use_triton(x):
            from lctrain.kernels.rms_norm import row_norm_fwd

            y, rstd = row_norm_fwd(_rows(x), weight, _rows(gate), eps)
            ctx.save_for_backward(x, weight, gate, rstd)
            return y.view(x.shape)
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = (xf * rstd * weight.float()).to(x.dtype)
        if gate is not None:
            y = (y.float() * F.silu(gate.float())).to(x.dtype)
        ctx.save_for_backward(x, weight, gate, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, gate, rstd = ctx.saved_tensors
        if use_triton(x):
            from lctrain.kernels.rms_norm import row_norm_bwd

            dx, dw, dgate = row_norm_bwd(_rows(dy), _rows(x), weight, _rows(gate), rstd)
            return (dx.view(x.shape), dw.to(weight.dtype), None if gate is None else dgate.view(gate.shape),
                    None)
        n = x.float() * rstd
        dy = dy.float()
        dgate = None
        if gate is not None:
            gf = gate.float()
            sig = torch.sigmoid(gf)
            a = n * weight.float()
            dgate = (dy * a * sig * (1 + gf * (1 - sig))).to(gate.dtype)
            dy = dy * gf * sig  # through silu(gate)
        dw = (dy * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        dn = dy * weight.float()
        dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, dgate, None


class _L2NormFn(torch.autograd.Function):
    """x / sqrt(sum(x^2) + eps) over the last dim, keeping only x and one float32 rstd per row for the
    backward (autograd through the float32 formula keeps a float32 copy of x: the mixers' q and k at
    8 KiB per token each). Same outputs; gradients equal up to rounding."""

    @staticmethod
    def forward(ctx, x, eps):
        if use_triton(x):
            from lctrain.kernels.rms_norm import row_norm_fwd

            y, rstd = row_norm_fwd(_rows(x), None, None, eps, mean=False)
            ctx.save_for_backward(x, rstd)
            return y.view(x.shape)
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd)
        return (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, rstd = ctx.saved_tensors
        if use_triton(x):
            from lctrain.kernels.rms_norm import row_norm_bwd

            return row_norm_bwd(_rows(dy), _rows(x), None, None, rstd, mean=False)[0].view(x.shape), None
        n = x.float() * rstd
        dy = dy.float()
        return (rstd * (dy - n * (dy * n).sum(-1, keepdim=True))).to(x.dtype), None


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in float32, returned in x's dtype (_L2NormFn)."""
    return _L2NormFn.apply(x, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight (times silu(gate) when given), computed in float32, returned
    in x's dtype; the backward keeps x, the gate and rstd only (_RMSNormFn)."""
    return _RMSNormFn.apply(x, weight, gate, eps)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    compiled = False  # model.compile: the compiled float32 formula (lctrain.models.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            return compiled(rms_norm_math)(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def norm_fn(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This norm with another (detached) weight tensor: what a chunked loss differentiates."""
        return rms_norm(x, weight, self.eps)


class GatedRMSNorm(RMSNorm):
    """Output norm of the linear mixers: RMSNorm(o) * silu(gate), per head (normalised over the last dim)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.compiled:
            return compiled(rms_norm_math)(x, self.weight, self.eps, gate)
        return rms_norm(x, self.weight, self.eps, gate)


def swiglu_hidden_size(d_model: int, mlp_ratio: float) -> int:
    """mlp_ratio * 2/3 * d_model rounded up to a multiple of 32 (keeps SwiGLU's parameters ~ a GELU MLP's)."""
    hidden = int(math.ceil(mlp_ratio * 2.0 / 3.0 * d_model))
    return max(32, 32 * int(math.ceil(hidden / 32)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); under tensor parallelism (tp_group) gate/up are column- and down
    row-parallel (each rank holds hidden / tp of the hidden units).

    `chunk_tokens` > 0 (model.mlp_chunk_tokens): while gradients are recorded, the sequence runs in
    chunks of that many tokens, each under non-reentrant activation checkpointing, so that the
    hidden-size activations (gate, up, silu(gate), their product: 4 x hidden / d_model = 10.7x the
    block's input per token at mlp_ratio 4) exist for one chunk at a time in the forward AND the
    backward, instead of being saved for the whole sequence. The price is one more MLP forward per
    chunk in the backward (the MLP's FLOPs rise by a third). Same outputs and gradients."""

    def __init__(self, d_model: int, hidden: int, chunk_tokens: int = 0, tp_group=None):
        super().__init__()
        self.gate_proj = column_linear(d_model, hidden, tp_group)
        self.up_proj = column_linear(d_model, hidden, tp_group)
        self.down_proj = row_linear(hidden, d_model, tp_group)
        self.down_proj.is_output_projection = True  # scaled init, see HybridLM._init_weights
        self.chunk_tokens = int(chunk_tokens)

    compiled = False  # model.compile: silu(gate) * up as one compiled kernel (lctrain.models.fused)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.compiled:
            return self.down_proj(compiled(swiglu_math)(gate, up))
        return self.down_proj(swiglu(gate, up, use_triton=use_triton(gate)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if self.chunk_tokens <= 0 or not torch.is_grad_enabled() or x.dim() != 3 or x.shape[0] * T <= self.chunk_tokens:
            return self._mlp(x)
        step = max(1, self.chunk_tokens // x.shape[0])  # tokens of each sequence per chunk
        return torch.cat([checkpoint(self._mlp, x[:, s:s + step], use_reentrant=False) for s in range(0, T, step)],
                         dim=1)


class ShortConv(nn.Module):
    """Causal depthwise conv over time on [B, T, C], kernel `kernel_size`, no bias, optional SiLU.

    `prefix` ([B, kernel_size-1, C]) supplies the inputs before the first position: the cached tail
    when decoding, or the previous CP rank's last positions (halo). Without it zeros are used. The
    conv then runs "valid" over prefix + x. Returns (y [B, T, C], the last kernel_size-1 inputs of
    prefix + x, i.e. the tail to cache).

    `position_in_document` ([B, T], packed documents): a tap reaching j positions back is dropped
    where the token has fewer than j tokens of its own document before it, so no document sees the
    end of the previous one (the prefix included)."""

    def __init__(self, channels: int, kernel_size: int, activation: bool = True, backend: str = "auto"):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"model.conv_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.activation = activation
        self.backend = backend  # lctrain.kernels.short_conv: auto = the Triton kernel on CUDA, F.conv1d on CPU
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # Conv1d's default init

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None,
                position_in_document: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        K = self.kernel_size
        if prefix is not None and tuple(prefix.shape) != (B, K - 1, C):
            raise ValueError(f"conv prefix must be [B, conv_size-1, C] = {[B, K - 1, C]}, got {list(prefix.shape)}")
        if position_in_document is None:
            y = causal_conv1d(x, self.weight[:, 0], prefix, self.activation, backend=self.backend)
            if T >= K - 1:
                return y, x[:, T - (K - 1):]
            before = x.new_zeros(B, K - 1, C) if prefix is None else prefix.to(x.dtype)
            return y, torch.cat([before, x], dim=1)[:, T:]
        if prefix is None:
            prefix = x.new_zeros(B, K - 1, C)
        xcat = torch.cat([prefix.to(x.dtype), x], dim=1)
        w = self.weight.to(x.dtype)
        # tap i multiplies x at lag K-1-i: keep it only inside the token's document
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
