"""Rotation of pairs (x1, x2) = (x[..., :R/2], x[..., R/2:R]) by cos / sin of the token's position:
y1 = x1 c - x2 s, y2 = x2 c + x1 s; backward dx1 = dy1 c + dy2 s, dx2 = dy2 c - dy1 s. Rows are the
(batch, token, head) triples of a contiguous [B, T, H, D] tensor; R = D (full rotation) only."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, N, T, H, D: tl.constexpr, HALF: tl.constexpr,
                BACKWARD: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    j = tl.arange(0, HALF)
    m = (rows < N)[:, None]
    t = (rows // H) % T
    base = rows[:, None] * D + j[None, :]
    x1 = tl.load(x_ptr + base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + HALF, mask=m, other=0.0).to(tl.float32)
    cs = t[:, None] * (2 * HALF) + j[None, :]  # cos / sin are [T, D] (the two halves equal)
    c = tl.load(cos_ptr + cs, mask=m, other=0.0)
    s = tl.load(sin_ptr + cs, mask=m, other=0.0)
    if BACKWARD:
        s = -s
    tl.store(y_ptr + base, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(y_ptr + base + HALF, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=m)


def _launch(x, cos, sin, backward):
    B, T, H, D = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    N = B * T * H
    BR = 32
    rope_kernel[(triton.cdiv(N, BR),)](x, cos, sin, y, N, T, H, D=D, HALF=D // 2, BACKWARD=backward, BR=BR,
                                       num_warps=4)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, True), None, None


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by cos / sin [T, D] (float32, contiguous; both halves equal), in x's dtype.
    Needs D a power of two (one tile per half); the caller keeps the eager path otherwise."""
    return _Rope.apply(x, cos.contiguous(), sin.contiguous())
