"""Triton backward of a chunk of Deltaformer's u-pass: the share a solved chunk's rows push onto the
earlier rows (the O(T) part of each chunk's backward; the c x c transposed solve stays in torch).

For the chunk c = [s, e) with its adjoint d_c final, bd = beta_c d_c and bdw_t = bd_t . w_t, the
probabilities P[t, j] = exp(scale k_t . k_j - lse_t) (j < t) are recomputed from k and the saved
row log-sum-exp, and with dS[t, j] = -P[t, j] (bd_t . u_j - bdw_t):

    rhs[j] -= sum_t P[t, j] bd_t          (earlier chunks' keys j < s: their adjoint right-hand side)
    dk[j]  += scale sum_t dS[t, j] k_t    (every key j < e)
    dk[t]  += scale sum_j dS[t, j] k_j    (the chunk's own rows)

One program owns a block of keys and loops over the chunk's rows, so rhs[j] and the key part of dk
need no atomics; the row part is a reduction over the key blocks: atomic adds into a chunk-sized
buffer, added to dk by the caller. Same contract as ``chunk.torch_chunk_push``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import _pow2


@triton.jit
def _chunk_push_kernel(k_ptr, u_ptr, lse_ptr, bd_ptr, bdw_ptr, rhs_ptr, dk_ptr, dkr_ptr, s, e, T, scale,
                       K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       BR: tl.constexpr, BT: tl.constexpr):
    pid_j = tl.program_id(0)
    bh = tl.program_id(1)
    c = e - s
    k_base = k_ptr + bh * T * K
    dk_base = dk_ptr + bh * T * K
    cols = pid_j * BT + tl.arange(0, BT)
    col_ok = cols < e
    dk_i = tl.arange(0, BK)
    dv_i = tl.arange(0, BV)
    kmask_c = col_ok[:, None] & (dk_i[None, :] < K)
    vmask_c = col_ok[:, None] & (dv_i[None, :] < V)
    kj = tl.load(k_base + cols[:, None] * K + dk_i[None, :], mask=kmask_c, other=0.0)
    uj = tl.load(u_ptr + bh * T * V + cols[:, None] * V + dv_i[None, :], mask=vmask_c, other=0.0)
    acc_rhs = tl.zeros([BT, BV], tl.float32)
    acc_dk = tl.zeros([BT, BK], tl.float32)
    for r0 in range(0, c, BR):
        r_loc = r0 + tl.arange(0, BR)
        rows = s + r_loc
        row_ok = r_loc < c
        kr = tl.load(k_base + rows[:, None] * K + dk_i[None, :], mask=row_ok[:, None] & (dk_i[None, :] < K),
                     other=0.0)
        lse = tl.load(lse_ptr + bh * T + rows, mask=row_ok, other=0.0)
        bd = tl.load(bd_ptr + bh * c * V + r_loc[:, None] * V + dv_i[None, :],
                     mask=row_ok[:, None] & (dv_i[None, :] < V), other=0.0)
        bdw = tl.load(bdw_ptr + bh * c + r_loc, mask=row_ok, other=0.0)
        sc = tl.dot(kr, tl.trans(kj)) * scale
        ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] < rows[:, None])
        p = tl.where(ok, tl.exp(tl.where(ok, sc, 0.0) - lse[:, None]), 0.0)
        acc_rhs += tl.dot(tl.trans(p), bd)
        ds = -p * (tl.dot(bd, tl.trans(uj)) - bdw[:, None])
        acc_dk += tl.dot(tl.trans(ds), kr)
        dkr = tl.dot(ds, kj) * scale
        tl.atomic_add(dkr_ptr + bh * c * K + r_loc[:, None] * K + dk_i[None, :], dkr,
                      mask=row_ok[:, None] & (dk_i[None, :] < K))
    # earlier chunks' keys take the rhs share (the chunk's own keys were solved for already)
    rmask = vmask_c & (cols[:, None] < s)
    rhs_ptrs = rhs_ptr + bh * T * V + cols[:, None] * V + dv_i[None, :]
    tl.store(rhs_ptrs, tl.load(rhs_ptrs, mask=rmask, other=0.0) - acc_rhs, mask=rmask)
    dk_ptrs = dk_base + cols[:, None] * K + dk_i[None, :]
    tl.store(dk_ptrs, tl.load(dk_ptrs, mask=kmask_c, other=0.0) + scale * acc_dk, mask=kmask_c)


def triton_chunk_push(k, u, lse, bd, bdw, rhs, dk, s: int, e: int, scale: float):
    """Same contract as ``chunk.torch_chunk_push`` (in place on rhs and dk); all float32 contiguous,
    k [B, H, T, K], u / rhs [B, H, T, V], lse [B, H, T], bd [B, H, c, V], bdw [B, H, c]."""
    if k.dtype != torch.float32:
        raise TypeError(f"deltaformer triton u-pass computes in float32; got k in {k.dtype}")
    B, H, T, K = k.shape
    V = u.shape[-1]
    c = e - s
    dkr = torch.zeros(B, H, c, K, device=k.device, dtype=torch.float32)
    wide = max(K, V) > 64
    BT = 32 if wide else 64
    BR = 64 if c >= 64 else _pow2(c)
    grid = (triton.cdiv(e, BT), B * H)
    _chunk_push_kernel[grid](k, u, lse, bd, bdw, rhs, dk, dkr, s, e, T, float(scale), K=K, V=V,
                             BK=_pow2(K), BV=_pow2(V), BR=BR, BT=BT, num_warps=8 if wide else 4)
    dk[:, :, s:e] += dkr
