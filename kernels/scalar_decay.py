"""Closed-form CP state passes of gated linear attention (a scalar decay per head and token).

With S_t = exp(g_t) S_{t-1} + k_t v_t^T and c_t = g_1 + ... + g_t (within the shard), the shard's
map and its state gradient are sums over tokens, not a chain:

    A = exp(c_T)                                   (the shard's scalar transition)
    B = sum_t exp(c_T - c_t) k_t v_t^T             (its final state from zero)
    G = sum_t scale exp(c_t) q_t do_t^T            (d sum(o * do) / d S_0)

Each is one batched [K, T] x [T, V] product per (batch, head): no sequential pass over chunks, so
it takes the time of a matmul at any shard length. Every weight is exp of a non-positive number
(decays are <= 1), so nothing overflows; the weighted operand is rounded to the input dtype (as the
chunk kernels round their operands) and products accumulate in fp32.
"""
from __future__ import annotations

import torch


def _weighted_product(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_t w[b, t, h] x[b, t, h, :] y[b, t, h, :]^T -> [B, H, K, V] float32."""
    B, T, H, K = x.shape
    V = y.shape[-1]
    wide = torch.promote_types(torch.float32, x.dtype)
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda else wide
    a = (x.to(wide) * w.to(wide)[..., None]).to(dt).permute(0, 2, 3, 1).reshape(B * H, K, T)
    b = y.to(dt).permute(0, 2, 1, 3).reshape(B * H, T, V)
    out = None
    if dt in (torch.float16, torch.bfloat16):
        try:
            out = torch.bmm(a, b, out_dtype=torch.float32)  # half inputs, fp32 accumulation and result
        except (TypeError, RuntimeError):  # a torch without bmm's out_dtype: the same product in fp32
            a, b = a.float(), b.float()
    if out is None:
        out = torch.bmm(a, b)
    return out.view(B, H, K, V).to(wide)


def scalar_decay_shard_transition(k, v, g):
    """(A [B, H], B [B, H, K, V]) of a gated-linear-attention shard, float32 (no autograd)."""
    with torch.no_grad():
        c = torch.cumsum(g.to(torch.promote_types(torch.float32, g.dtype)), dim=1)   # [B, T, H]
        total = c[:, -1]
        return torch.exp(total), _weighted_product(k, torch.exp(total[:, None] - c), v)


def scalar_decay_shard_state_grad(q, do, g, scale=None):
    """G [B, H, K, V] float32 of a gated-linear-attention shard (no autograd)."""
    with torch.no_grad():
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        c = torch.cumsum(g.to(torch.promote_types(torch.float32, g.dtype)), dim=1)
        return _weighted_product(q, scale * torch.exp(c), do)
