"""Triton backward of Deltaformer's chunked u-pass (the parts that read all earlier / later tokens;
the c x c transposed solves stay in torch, ``chunk.chunk_backward``).

In the reverse loop, after chunk c = [s, e) is solved, its rows push onto the earlier chunks'
right-hand sides (``triton_chunk_push``):

    rhs[j] -= sum_{t in c} P[t, j] bd_t          (j < s; bd = beta d, P recomputed from k and lse)

one program per block of keys j looping over the chunk's rows (no atomics: a program owns its keys).
After the loop every adjoint is final and the key gradient is one pass over the whole triangle
(``triton_key_grads``), with dS[t, j] = -P[t, j] (bd_t . u_j - bdw_t), bdw_t = bd_t . w_t:

    dk[t] = scale sum_{j<t} dS[t, j] k_j    (rows kernel: a program per block of rows, keys streamed)
    dk[j] += scale sum_{t>j} dS[t, j] k_t   (columns kernel: a program per block of keys, rows streamed)

like flash attention's backward, each output written by one program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import _pow2


@triton.jit
def _push_kernel(k_ptr, lse_ptr, bd_ptr, rhs_ptr, s, e, T, scale,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 BR: tl.constexpr, BT: tl.constexpr):
    pid_j = tl.program_id(0)
    bh = tl.program_id(1)
    c = e - s
    k_base = k_ptr + bh * T * K
    cols = pid_j * BT + tl.arange(0, BT)
    col_ok = cols < s
    dk_i = tl.arange(0, BK)
    dv_i = tl.arange(0, BV)
    kj = tl.load(k_base + cols[:, None] * K + dk_i[None, :], mask=col_ok[:, None] & (dk_i[None, :] < K), other=0.0)
    acc = tl.zeros([BT, BV], tl.float32)
    for r0 in range(0, c, BR):
        r_loc = r0 + tl.arange(0, BR)
        rows = s + r_loc
        row_ok = r_loc < c
        kr = tl.load(k_base + rows[:, None] * K + dk_i[None, :], mask=row_ok[:, None] & (dk_i[None, :] < K),
                     other=0.0)
        lse = tl.load(lse_ptr + bh * T + rows, mask=row_ok, other=0.0)
        bd = tl.load(bd_ptr + bh * T * V + r_loc[:, None] * V + dv_i[None, :],   # bd points at row s
                     mask=row_ok[:, None] & (dv_i[None, :] < V), other=0.0)
        sc = tl.dot(kr, tl.trans(kj)) * scale
        ok = row_ok[:, None] & col_ok[None, :]
        p = tl.where(ok, tl.exp(tl.where(ok, sc, 0.0) - lse[:, None]), 0.0)
        acc += tl.dot(tl.trans(p), bd)
    vmask = col_ok[:, None] & (dv_i[None, :] < V)
    ptrs = rhs_ptr + bh * T * V + cols[:, None] * V + dv_i[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=vmask, other=0.0) - acc, mask=vmask)


@triton.jit
def _ds_block(kr, kj, lse, bd, bdw, uj, rows, cols, row_ok, col_ok, scale):
    """dS[t, j] = -P[t, j] (bd_t . u_j - bdw_t) on a [rows, cols] block, zero unless j < t."""
    sc = tl.dot(kr, tl.trans(kj)) * scale
    ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] < rows[:, None])
    p = tl.where(ok, tl.exp(tl.where(ok, sc, 0.0) - lse[:, None]), 0.0)
    return -p * (tl.dot(bd, tl.trans(uj)) - bdw[:, None])


@triton.jit
def _dk_rows_kernel(k_ptr, u_ptr, lse_ptr, bd_ptr, bdw_ptr, dk_ptr, T, scale,
                    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    BR: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    k_base = k_ptr + bh * T * K
    u_base = u_ptr + bh * T * V
    rows = pid * BR + tl.arange(0, BR)
    row_ok = rows < T
    dk_i = tl.arange(0, BK)
    dv_i = tl.arange(0, BV)
    kmask_r = row_ok[:, None] & (dk_i[None, :] < K)
    kr = tl.load(k_base + rows[:, None] * K + dk_i[None, :], mask=kmask_r, other=0.0)
    lse = tl.load(lse_ptr + bh * T + rows, mask=row_ok, other=0.0)
    bd = tl.load(bd_ptr + bh * T * V + rows[:, None] * V + dv_i[None, :], mask=row_ok[:, None] & (dv_i[None, :] < V),
                 other=0.0)
    bdw = tl.load(bdw_ptr + bh * T + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BR, BK], tl.float32)
    for j0 in range(0, tl.minimum((pid + 1) * BR, T), BT):
        cols = j0 + tl.arange(0, BT)
        col_ok = cols < T
        kj = tl.load(k_base + cols[:, None] * K + dk_i[None, :], mask=col_ok[:, None] & (dk_i[None, :] < K),
                     other=0.0)
        uj = tl.load(u_base + cols[:, None] * V + dv_i[None, :], mask=col_ok[:, None] & (dv_i[None, :] < V),
                     other=0.0)
        ds = _ds_block(kr, kj, lse, bd, bdw, uj, rows, cols, row_ok, col_ok, scale)
        acc += tl.dot(ds, kj)
    tl.store(dk_ptr + bh * T * K + rows[:, None] * K + dk_i[None, :], scale * acc, mask=kmask_r)


@triton.jit
def _dk_cols_kernel(k_ptr, u_ptr, lse_ptr, bd_ptr, bdw_ptr, dk_ptr, T, scale,
                    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    BR: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    k_base = k_ptr + bh * T * K
    cols = pid * BT + tl.arange(0, BT)
    col_ok = cols < T
    dk_i = tl.arange(0, BK)
    dv_i = tl.arange(0, BV)
    kmask_c = col_ok[:, None] & (dk_i[None, :] < K)
    kj = tl.load(k_base + cols[:, None] * K + dk_i[None, :], mask=kmask_c, other=0.0)
    uj = tl.load(u_ptr + bh * T * V + cols[:, None] * V + dv_i[None, :], mask=col_ok[:, None] & (dv_i[None, :] < V),
                 other=0.0)
    acc = tl.zeros([BT, BK], tl.float32)
    for r0 in range((pid * BT) // BR * BR, T, BR):
        rows = r0 + tl.arange(0, BR)
        row_ok = rows < T
        kr = tl.load(k_base + rows[:, None] * K + dk_i[None, :], mask=row_ok[:, None] & (dk_i[None, :] < K),
                     other=0.0)
        lse = tl.load(lse_ptr + bh * T + rows, mask=row_ok, other=0.0)
        bd = tl.load(bd_ptr + bh * T * V + rows[:, None] * V + dv_i[None, :],
                     mask=row_ok[:, None] & (dv_i[None, :] < V), other=0.0)
        bdw = tl.load(bdw_ptr + bh * T + rows, mask=row_ok, other=0.0)
        ds = _ds_block(kr, kj, lse, bd, bdw, uj, rows, cols, row_ok, col_ok, scale)
        acc += tl.dot(tl.trans(ds), kr)
    ptrs = dk_ptr + bh * T * K + cols[:, None] * K + dk_i[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=kmask_c, other=0.0) + scale * acc, mask=kmask_c)


def _blocks(K: int, V: int):
    wide = max(K, V) > 64
    return dict(BK=_pow2(K), BV=_pow2(V), BR=64, BT=32 if wide else 64, num_warps=8 if wide else 4)


def _check(k):
    if k.dtype != torch.float32:
        raise TypeError(f"deltaformer triton u-pass computes in float32; got k in {k.dtype}")


def triton_chunk_push(k, lse, bd, rhs, s: int, e: int, scale: float):
    """Same contract as ``chunk.torch_chunk_push`` (in place on rhs); float32, k [B, H, T, K],
    lse [B, H, T], bd [B, H, c, V] (a view of the chunk's rows in a [B, H, T, V] tensor), rhs [B, H, T, V]."""
    _check(k)
    if s == 0:
        return
    B, H, T, K = k.shape
    V = rhs.shape[-1]
    if bd.stride() != (H * T * V, T * V, V, 1):
        raise ValueError("triton_chunk_push: bd must be a chunk slice of a contiguous [B, H, T, V] tensor")
    blk = _blocks(K, V)
    _push_kernel[(triton.cdiv(s, blk["BT"]), B * H)](k, lse, bd, rhs, s, e, T, float(scale), K=K, V=V, **blk)


def triton_key_grads(k, u, lse, bd, bdw, scale: float, chunk_size: int):
    """Same contract as ``chunk.torch_key_grads`` (chunk_size unused: the blocks are the kernel's)."""
    _check(k)
    B, H, T, K = k.shape
    V = u.shape[-1]
    blk = _blocks(K, V)
    dk = torch.empty_like(k)
    args = (k, u, lse, bd.contiguous(), bdw.contiguous(), dk, T, float(scale))
    _dk_rows_kernel[(triton.cdiv(T, blk["BR"]), B * H)](*args, K=K, V=V, **blk)
    _dk_cols_kernel[(triton.cdiv(T, blk["BT"]), B * H)](*args, K=K, V=V, **blk)
    return dk
