"""Triton causal depthwise short conv (+ SiLU): forward and backward kernels on the [B, T, C] layout.

Why: ``F.conv1d`` needs channels first, so the torch path transposes the projections' [B, T, C]
output, runs cuDNN's depthwise conv (slow in the weight gradient), and hands the mixer a
transposed (strided) tensor that every later elementwise op and the kernel's ``.contiguous()`` pay
for; autograd also keeps xcat and the pre-activation. Here one program computes a tile from K
shifted, coalesced loads with float32 accumulation and the SiLU in the same pass. The backward
keeps only x: a first kernel recomputes the pre-activation, forms its gradient dpre (stored, like
eager's silu backward, in x's dtype) and per program partial sums of dw (a fixed number of programs
along T, each looping over tiles; added up in torch, deterministic); a second runs dpre backwards
through the taps for dx. A one-kernel backward that recomputed the pre-activation at every tap's
shift took 3.6 ms per [32K, 2048] conv on an H200 (against 0.15 ms forward): compiled, it spilled
4.9 KB per thread. The prefix's own gradient (K-1 rows, the CP halo's) is computed in torch from
the reference. Math: ``naive.py``. Taps: K <= 4 (MAX_TAPS)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import MAX_TAPS  # noqa: F401  (the dpre kernel keeps one dw accumulator per tap)
from .naive import naive_causal_conv1d

# tiles (tokens x channels) and warps per kernel, chosen so that none spills registers on sm_90 (cuobjdump
# --dump-resource-usage of the compiled kernels: the dpre kernel at 64 x 128 held 255 registers and
# spilled 0.5-1 KB per thread; at 16 x 128 it holds ~160 and spills nothing)
BT, BC, FWD_WARPS = 32, 128, 8       # forward and dx
BT_DPRE, DPRE_WARPS = 16, 4          # dpre + dw partials
BWD_PROGRAMS_T = 128  # dpre programs along T (each loops over tiles): dw partials [B * 128, C, K] at any T


@triton.jit
def _load_x(x_ptr, pre_ptr, b, rows, c, T, C, K: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """x[b, rows, c] as float32 [BT, BC]; rows < 0 read the prefix ([B, K-1, C]) or zeros, rows >= T zeros."""
    cm = (c < C)[None, :]
    inside = ((rows >= 0) & (rows < T))[:, None] & cm
    r = tl.maximum(rows, 0).to(tl.int64)
    v = tl.load(x_ptr + (b * T + r)[:, None] * C + c[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_PREFIX:
        before = ((rows < 0) & (rows >= 1 - K))[:, None] & cm
        p = tl.maximum(rows + (K - 1), 0).to(tl.int64)
        v += tl.load(pre_ptr + (b * (K - 1) + p)[:, None] * C + c[None, :], mask=before, other=0.0).to(tl.float32)
    return v


@triton.jit
def _pre_activation(x_ptr, pre_ptr, w_ptr, b, rows, c, T, C, K: tl.constexpr, HAS_PREFIX: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr):
    """sum_i w[c, i] x[b, rows - (K-1) + i, c] in float32 ([BT, BC])."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(K):
        w = tl.load(w_ptr + c * K + i, mask=c < C, other=0.0).to(tl.float32)
        acc += _load_x(x_ptr, pre_ptr, b, rows - (K - 1) + i, c, T, C, K, HAS_PREFIX) * w[None, :]
    return acc


@triton.jit
def _dsilu(p):
    s = tl.sigmoid(p)
    return s * (1.0 + p * (1.0 - s))


@triton.jit
def conv_fwd_kernel(x_ptr, pre_ptr, w_ptr, y_ptr, T, C, K: tl.constexpr, HAS_PREFIX: tl.constexpr,
                    ACT: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    acc = _pre_activation(x_ptr, pre_ptr, w_ptr, b, rows, c, T, C, K, HAS_PREFIX, BT, BC)
    if ACT:
        acc = acc * tl.sigmoid(acc)
    mask = (rows < T)[:, None] & (c < C)[None, :]
    tl.store(y_ptr + (b * T + rows.to(tl.int64))[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_dpre_kernel(x_ptr, pre_ptr, w_ptr, dy_ptr, dpre_ptr, dwp_ptr, T, C, NT, K: tl.constexpr,
                     HAS_PREFIX: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Backward, first pass, over the tiles pid_t, pid_t + P, ... (P programs along T): the gradient of
    the pre-activation dpre = dy * silu'(pre) (pre recomputed from x; stored in x's dtype, as eager's
    silu backward hands it to the conv) and the programs' partial dw (sum over their rows of
    dpre * x[t - (K-1) + j]) into dwp [B * P, C, K]: a fixed number of partials at any length.
    K <= MAX_TAPS (one accumulator per tap)."""
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    P = tl.num_programs(0)
    c = pid_c * BC + tl.arange(0, BC)
    cm = c < C
    dw0 = tl.zeros([BC], dtype=tl.float32)
    dw1 = tl.zeros([BC], dtype=tl.float32)
    dw2 = tl.zeros([BC], dtype=tl.float32)
    dw3 = tl.zeros([BC], dtype=tl.float32)
    for tile_t in range(pid_t, NT, P):
        rows = tile_t * BT + tl.arange(0, BT)
        valid = (rows < T)[:, None] & cm[None, :]
        offs = (b * T + rows.to(tl.int64))[:, None] * C + c[None, :]
        dp = tl.load(dy_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if ACT:
            dp = dp * _dsilu(_pre_activation(x_ptr, pre_ptr, w_ptr, b, rows, c, T, C, K, HAS_PREFIX, BT, BC))
            tl.store(dpre_ptr + offs, dp.to(dpre_ptr.dtype.element_ty), mask=valid)
        for j in tl.static_range(K):
            part = tl.sum(dp * _load_x(x_ptr, pre_ptr, b, rows - (K - 1) + j, c, T, C, K, HAS_PREFIX), axis=0)
            if j == 0:
                dw0 += part
            elif j == 1:
                dw1 += part
            elif j == 2:
                dw2 += part
            else:
                dw3 += part
    base = ((b * P + pid_t).to(tl.int64) * C + c) * K
    tl.store(dwp_ptr + base, dw0, mask=cm)
    if K > 1:
        tl.store(dwp_ptr + base + 1, dw1, mask=cm)
    if K > 2:
        tl.store(dwp_ptr + base + 2, dw2, mask=cm)
    if K > 3:
        tl.store(dwp_ptr + base + 3, dw3, mask=cm)


@triton.jit
def conv_dx_kernel(dpre_ptr, w_ptr, dx_ptr, T, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Backward, second pass: dx[s, c] = sum_i w[c, i] dpre[s + K-1-i, c] (a causal conv run backwards)."""
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    cm = c < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(K):
        t = rows + (K - 1 - i)
        inside = (t < T)[:, None] & cm[None, :]
        d = tl.load(dpre_ptr + (b * T + tl.minimum(t, T - 1).to(tl.int64))[:, None] * C + c[None, :], mask=inside,
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c * K + i, mask=cm, other=0.0).to(tl.float32)
        acc += d * w[None, :]
    tl.store(dx_ptr + (b * T + rows.to(tl.int64))[:, None] * C + c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(rows < T)[:, None] & cm[None, :])


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, prefix, activation):
        B, T, C = x.shape
        K = weight.shape[-1]
        x = x.contiguous()
        w = weight.contiguous()
        has_prefix = prefix is not None and K > 1
        pre = prefix.to(x.dtype).contiguous() if has_prefix else x
        y = torch.empty_like(x)
        grid = (triton.cdiv(T, BT), triton.cdiv(C, BC), B)
        conv_fwd_kernel[grid](x, pre, w, y, T, C, K=K, HAS_PREFIX=has_prefix, ACT=bool(activation), BT=BT, BC=BC,
                              num_warps=FWD_WARPS)
        ctx.save_for_backward(x, w, pre if has_prefix else None)
        ctx.activation, ctx.has_prefix = bool(activation), has_prefix
        ctx.prefix_dtype = None if prefix is None else prefix.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, pre = ctx.saved_tensors
        B, T, C = x.shape
        K = w.shape[-1]
        dy = dy.contiguous()
        NT = triton.cdiv(T, BT_DPRE)
        P = min(NT, BWD_PROGRAMS_T)
        # dpre: the pre-activation's gradient (without the SiLU it is dy itself)
        dpre = torch.empty_like(x) if ctx.activation else dy
        dwp = torch.empty(B * P, C, K, device=x.device, dtype=torch.float32)
        conv_dpre_kernel[(P, triton.cdiv(C, BC), B)](x, pre if ctx.has_prefix else x, w, dy, dpre, dwp, T, C, NT,
                                                     K=K, HAS_PREFIX=ctx.has_prefix,
                                                     ACT=ctx.activation, BT=BT_DPRE, BC=BC, num_warps=DPRE_WARPS)
        dx = torch.empty_like(x)
        conv_dx_kernel[(triton.cdiv(T, BT), triton.cdiv(C, BC), B)](dpre, w, dx, T, C, K=K, BT=BT, BC=BC,
                                                                    num_warps=FWD_WARPS)
        del dpre
        dw = dwp.sum(0).to(w.dtype)
        dprefix = None
        if ctx.needs_input_grad[2]:
            if ctx.has_prefix:  # only the first K-1 outputs read the prefix: differentiate the reference there
                n = min(K - 1, T)
                with torch.enable_grad():
                    p = pre.detach().float().requires_grad_(True)
                    y = naive_causal_conv1d(x[:, :n].float(), w.float(), p, ctx.activation)
                    (dprefix,) = torch.autograd.grad(y, p, dy[:, :n].float())
                dprefix = dprefix.to(ctx.prefix_dtype)
            else:  # K == 1: the prefix is empty
                dprefix = torch.zeros(B, 0, C, device=x.device, dtype=ctx.prefix_dtype)
        return dx, dw, dprefix, None


def triton_causal_conv1d(x, weight, prefix=None, activation=True):
    return _CausalConv1d.apply(x, weight, prefix, activation)
