"""Closed-form CP state passes of gated linear attention (a scalar decay per head and token).

With S_t = exp(g_t) S_{t-1} + k_t v_t^T and c_t = g_1 + ... + g_t (within the shard), the shard's
map and its state gradient are sums over tokens, not a chain:

    A = exp(c_T)                                   (the shard's scalar transition)
    B = sum_t exp(c_T - c_t) k_t v_t^T             (its final state from zero)
    G = sum_t scale exp(c_t) q_t do_t^T            (d sum(o * do) / d S_0)

Each is a batched matmul ([K, T] x [T, V] per batch and head, cut into blocks of tokens so that
the GPU has enough output tiles): no sequential pass over chunks. Every weight is exp of a
non-positive number (decays are <= 1), so nothing overflows; the weighted operand is in the input
dtype (as the chunk kernels round their operands), products accumulate in fp32 and the blocks'
partial sums are added in fp32.
"""
from __future__ import annotations

import torch

# tokens per partial product: a [K, T] x [T, V] product per (batch, head) alone has B*H output tiles,
# too few to fill a GPU (cuBLAS ran 16 of them for 12 ms at T = 32K); cut T into blocks of this many
# tokens, one product each, and sum the partial results in fp32
TOKENS_PER_PRODUCT = 1024


def _weighted_product(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_t w[b, t, h] x[b, t, h, :] y[b, t, h, :]^T -> [B, H, K, V] in fp32 (or x's wider dtype).
    Half inputs on CUDA: half products with fp32 accumulation, each block's partial rounded once."""
    B, T, H, K = x.shape
    V = y.shape[-1]
    wide = torch.promote_types(torch.float32, x.dtype)
    half = x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda
    xw = x * w.to(x.dtype)[..., None] if half else x.to(wide) * w.to(wide)[..., None]
    y = y.to(xw.dtype)
    tc = min(T, TOKENS_PER_PRODUCT)
    nc = -(-T // tc)
    if nc * tc != T:  # zero tokens add nothing
        pad = (0, 0, 0, 0, 0, nc * tc - T)
        xw, y = torch.nn.functional.pad(xw, pad), torch.nn.functional.pad(y, pad)
    a = xw.reshape(B, nc, tc, H, K).permute(0, 3, 1, 4, 2).reshape(B * H * nc, K, tc)
    b = y.reshape(B, nc, tc, H, V).permute(0, 3, 1, 2, 4).reshape(B * H * nc, tc, V)
    return torch.bmm(a, b).view(B, H, nc, K, V).to(wide).sum(2)


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
