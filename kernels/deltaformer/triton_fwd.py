"""Triton statistics of a chunk of Deltaformer's u-pass (the part that reads all earlier keys).

For the rows t of the chunk [s, e) one program streams the keys in blocks, flash-attention style,
and keeps the running max m, sum l and acc = sum_{j<s} exp(S[t, j] - m) u_j (the earlier chunks'
u only; the intra-chunk u are not known yet). It writes

    lse_t = m + log l              over ALL j < t (earlier chunks and the strict intra-chunk part)
    w_prev_t = acc / l             = P[t, :s] @ u[:s]
    P[t, s:e] = exp(S[t, j] - lse_t) (j < t)

so ``chunk.chunk_forward`` can solve the chunk. The scores block [c, e] is never materialised.
The backward is ``chunk.chunk_backward`` with the Triton push of ``triton_bwd.py``, through ``chunk.UPass``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG = -1e30


@triton.jit
def _chunk_stats_kernel(k_ptr, u_ptr, w_ptr, p_ptr, lse_ptr, s, c, T, scale,
                        K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        BR: tl.constexpr, BT: tl.constexpr):
    pid_r = tl.program_id(0)
    bh = tl.program_id(1)
    k_base = k_ptr + bh * T * K
    u_base = u_ptr + bh * T * V
    r_loc = pid_r * BR + tl.arange(0, BR)          # row index inside the chunk
    rows = s + r_loc
    row_ok = r_loc < c
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    kq = tl.load(k_base + rows[:, None] * K + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < K), other=0.0)
    m = tl.full([BR], NEG, tl.float32)
    l = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BV], tl.float32)
    # earlier chunks: every key j < s precedes every row, no causal mask
    for j0 in range(0, s, BT):
        cols = j0 + tl.arange(0, BT)
        col_ok = cols < s
        kj = tl.load(k_base + cols[:, None] * K + dk[None, :], mask=col_ok[:, None] & (dk[None, :] < K), other=0.0)
        sc = tl.dot(kq, tl.trans(kj)) * scale
        ok = row_ok[:, None] & col_ok[None, :]
        sc = tl.where(ok, sc, NEG)
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.where(ok, tl.exp(sc - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(p, 1)
        uj = tl.load(u_base + cols[:, None] * V + dv[None, :], mask=col_ok[:, None] & (dv[None, :] < V), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, uj)
        m = m_new
    # the chunk itself: keys s <= j < t (normaliser only)
    for j0 in range(s, s + c, BT):
        cols = j0 + tl.arange(0, BT)
        kj = tl.load(k_base + cols[:, None] * K + dk[None, :], mask=(cols[:, None] < s + c) & (dk[None, :] < K),
                     other=0.0)
        sc = tl.dot(kq, tl.trans(kj)) * scale
        ok = row_ok[:, None] & (cols[None, :] < rows[:, None])
        sc = tl.where(ok, sc, NEG)
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.where(ok, tl.exp(sc - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m = m_new
    has = l > 0
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), 0.0)
    w = acc / tl.where(has, l, 1.0)[:, None]
    tl.store(lse_ptr + bh * c + r_loc, lse, mask=row_ok)
    tl.store(w_ptr + bh * c * V + r_loc[:, None] * V + dv[None, :], w, mask=row_ok[:, None] & (dv[None, :] < V))
    # intra-chunk probabilities with the final normaliser
    for j0 in range(s, s + c, BT):
        cols = j0 + tl.arange(0, BT)
        kj = tl.load(k_base + cols[:, None] * K + dk[None, :], mask=(cols[:, None] < s + c) & (dk[None, :] < K),
                     other=0.0)
        sc = tl.dot(kq, tl.trans(kj)) * scale
        ok = row_ok[:, None] & (cols[None, :] < rows[:, None])
        p = tl.where(ok, tl.exp(tl.where(ok, sc, 0.0) - lse[:, None]), 0.0)
        c_loc = cols - s
        tl.store(p_ptr + bh * c * c + r_loc[:, None] * c + c_loc[None, :], p,
                 mask=row_ok[:, None] & (c_loc[None, :] < c))


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def triton_chunk_stats(k: torch.Tensor, u: torch.Tensor, s: int, e: int, scale: float):
    """Same contract as ``chunk.torch_chunk_stats``; k [B, H, T, K], u [B, H, T, V] contiguous float32."""
    if k.dtype != torch.float32:
        raise TypeError(f"deltaformer triton u-pass computes in float32; got k in {k.dtype}")
    B, H, T, K = k.shape
    V = u.shape[-1]
    c = e - s
    w = torch.empty(B, H, c, V, device=k.device, dtype=torch.float32)
    p = torch.empty(B, H, c, c, device=k.device, dtype=torch.float32)
    lse = torch.empty(B, H, c, device=k.device, dtype=torch.float32)
    BR = min(64, _pow2(c))
    BT = 64 if max(K, V) <= 128 else 32
    grid = (triton.cdiv(c, BR), B * H)
    _chunk_stats_kernel[grid](k, u, w, p, lse, s, c, T, float(scale), K=K, V=V, BK=_pow2(K), BV=_pow2(V),
                              BR=BR, BT=BT, num_warps=4 if max(K, V) <= 64 else 8)
    return w, p, lse
