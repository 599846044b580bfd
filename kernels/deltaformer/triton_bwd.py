"""Triton backward of Deltaformer's chunked u-pass (the parts that read all earlier / later tokens;
the c x c transposed solves stay in torch, ``chunk.chunk_backward``).

With bd = beta d (d the adjoint of u), bdw_t = bd_t . w_t, P[t, j] = exp(scale k_t . k_j - lse_t)
recomputed from k and the saved row log-sum-exp, and dS[t, j] = -P[t, j] (bd_t . u_j - bdw_t):

- ``_push_kernel``: rhs[j] -= sum_t P[t, j] bd_t for a block of rows t and keys j all before them.
  In the reverse loop, after chunk [s, e) is solved, its rows push onto the keys j < s (one
  program per block of keys, looping over the rows: no atomics).
- ``_dk_cols_kernel``: dk[j] += scale sum_t dS[t, j] k_t (a program per block of keys, rows streamed).
- ``_dk_rows_kernel``: dk[t] (+)= scale sum_j dS[t, j] k_j (a program per block of rows, keys streamed).

The key gradient needs only final adjoints, so the single-process u-pass runs both dk kernels once
after the loop over the whole causal triangle (like flash attention's backward, each output written
by one program). Context parallelism uses the same kernels between two tensors (``CAUSAL`` off:
another rank's rows all come after this rank's keys): ``triton_pull`` (later rows onto this rank's
keys: push + columns) and ``triton_rows_vs_keys`` (this rank's rows against a piece of earlier keys).
Row and key tensors are passed as row-contiguous views starting at their first row / key, with
their own per-head strides (Tr, Tk rows), so slices of a rank's tensors need no copies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import chunk
from .triton_fwd import _check, _dot, _key_block, _pow2, dot_precision


@triton.jit
def _push_kernel(kr_ptr, lse_ptr, bd_ptr, kk_ptr, rhs_ptr, nrows, Tr, nkeys, Tk, scale,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 BR: tl.constexpr, BT: tl.constexpr, DOT: tl.constexpr):
    pid_j = tl.program_id(0)
    bh = tl.program_id(1)
    cols = pid_j * BT + tl.arange(0, BT)
    col_ok = cols < nkeys
    dk_i = tl.arange(0, BK)
    dv_i = tl.arange(0, BV)
    kj = tl.load(kk_ptr + bh * Tk * K + cols[:, None] * K + dk_i[None, :], mask=col_ok[:, None] & (dk_i[None, :] < K),
                 other=0.0)
    acc = tl.zeros([BT, BV], tl.float32)
    for r0 in range(0, nrows, BR):
        rows = r0 + tl.arange(0, BR)
        row_ok = rows < nrows
        kr = tl.load(kr_ptr + bh * Tr * K + rows[:, None] * K + dk_i[None, :],
                     mask=row_ok[:, None] & (dk_i[None, :] < K), other=0.0)
        lse = tl.load(lse_ptr + bh * Tr + rows, mask=row_ok, other=0.0)
        bd = tl.load(bd_ptr + bh * Tr * V + rows[:, None] * V + dv_i[None, :],
                     mask=row_ok[:, None] & (dv_i[None, :] < V), other=0.0)
        sc = _dot(kr, tl.trans(kj), DOT) * scale
        ok = row_ok[:, None] & col_ok[None, :]
        p = tl.where(ok, tl.exp(tl.where(ok, sc, 0.0) - lse[:, None]), 0.0)
        acc += _dot(tl.trans(p), bd, DOT)
    vmask = col_ok[:, None] & (dv_i[None, :] < V)
    ptrs = rhs_ptr + bh * Tk * V + cols[:, None] * V + dv_i[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=vmask, other=0.0) - acc, mask=vmask)


@triton.jit
def _ds_block(kr, kj, lse, bd, bdw, uj, rows, cols, row_ok, col_ok, scale, CAUSAL: tl.constexpr,
              DOT: tl.constexpr):
    """dS[t, j] = -P[t, j] (bd_t . u_j - bdw_t) on a [rows, cols] block (zero unless j < t if CAUSAL)."""
    sc = _dot(kr, tl.trans(kj), DOT) * scale
    ok = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] < rows[:, None])
    p = tl.where(ok, tl.exp(tl.where(ok, sc, 0.0) - lse[:, None]), 0.0)
    return -p * (_dot(bd, tl.trans(uj), DOT) - bdw[:, None])


@triton.jit
def _dk_rows_kernel(kr_ptr, lse_ptr, bd_ptr, bdw_ptr, kk_ptr, uk_ptr, dk_ptr, nrows, Tr, nkeys, Tk, scale,
                    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    BR: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr,
                    DOT: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    rows = pid * BR + tl.arange(0, BR)
    row_ok = rows < nrows
    dk_i = tl.arange(0, BK)
    dv_i = tl.arange(0, BV)
    kmask_r = row_ok[:, None] & (dk_i[None, :] < K)
    kr = tl.load(kr_ptr + bh * Tr * K + rows[:, None] * K + dk_i[None, :], mask=kmask_r, other=0.0)
    lse = tl.load(lse_ptr + bh * Tr + rows, mask=row_ok, other=0.0)
    bd = tl.load(bd_ptr + bh * Tr * V + rows[:, None] * V + dv_i[None, :], mask=row_ok[:, None] & (dv_i[None, :] < V),
                 other=0.0)
    bdw = tl.load(bdw_ptr + bh * Tr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BR, BK], tl.float32)
    j_end = nkeys
    if CAUSAL:
        j_end = tl.minimum((pid + 1) * BR, nkeys)
    for j0 in range(0, j_end, BT):
        cols = j0 + tl.arange(0, BT)
        col_ok = cols < nkeys
        kj = tl.load(kk_ptr + bh * Tk * K + cols[:, None] * K + dk_i[None, :],
                     mask=col_ok[:, None] & (dk_i[None, :] < K), other=0.0)
        uj = tl.load(uk_ptr + bh * Tk * V + cols[:, None] * V + dv_i[None, :],
                     mask=col_ok[:, None] & (dv_i[None, :] < V), other=0.0)
        ds = _ds_block(kr, kj, lse, bd, bdw, uj, rows, cols, row_ok, col_ok, scale, CAUSAL, DOT)
        acc += _dot(ds, kj, DOT)
    ptrs = dk_ptr + bh * Tr * K + rows[:, None] * K + dk_i[None, :]
    if ACCUMULATE:
        acc = acc * scale + tl.load(ptrs, mask=kmask_r, other=0.0)
    else:
        acc = acc * scale
    tl.store(ptrs, acc, mask=kmask_r)


@triton.jit
def _dk_cols_kernel(kr_ptr, lse_ptr, bd_ptr, bdw_ptr, kk_ptr, uk_ptr, dk_ptr, nrows, Tr, nkeys, Tk, scale,
                    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    BR: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    cols = pid * BT + tl.arange(0, BT)
    col_ok = cols < nkeys
    dk_i = tl.arange(0, BK)
    dv_i = tl.arange(0, BV)
    kmask_c = col_ok[:, None] & (dk_i[None, :] < K)
    kj = tl.load(kk_ptr + bh * Tk * K + cols[:, None] * K + dk_i[None, :], mask=kmask_c, other=0.0)
    uj = tl.load(uk_ptr + bh * Tk * V + cols[:, None] * V + dv_i[None, :], mask=col_ok[:, None] & (dv_i[None, :] < V),
                 other=0.0)
    acc = tl.zeros([BT, BK], tl.float32)
    r_start = 0
    if CAUSAL:
        r_start = (pid * BT) // BR * BR
    for r0 in range(r_start, nrows, BR):
        rows = r0 + tl.arange(0, BR)
        row_ok = rows < nrows
        kr = tl.load(kr_ptr + bh * Tr * K + rows[:, None] * K + dk_i[None, :],
                     mask=row_ok[:, None] & (dk_i[None, :] < K), other=0.0)
        lse = tl.load(lse_ptr + bh * Tr + rows, mask=row_ok, other=0.0)
        bd = tl.load(bd_ptr + bh * Tr * V + rows[:, None] * V + dv_i[None, :],
                     mask=row_ok[:, None] & (dv_i[None, :] < V), other=0.0)
        bdw = tl.load(bdw_ptr + bh * Tr + rows, mask=row_ok, other=0.0)
        ds = _ds_block(kr, kj, lse, bd, bdw, uj, rows, cols, row_ok, col_ok, scale, CAUSAL, DOT)
        acc += _dot(tl.trans(ds), kr, DOT)
    ptrs = dk_ptr + bh * Tk * K + cols[:, None] * K + dk_i[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=kmask_c, other=0.0) + scale * acc, mask=kmask_c)


def _blocks(K: int, V: int):
    """Launch settings by head dim. Above 64, two pipeline stages: with three the columns kernel needs
    201 KiB of shared memory at head dim 128 (``python -m lctrain.bench.kernel_resources --op
    deltaformer``), too close to Hopper's 227 KiB."""
    wide = max(K, V) > 64
    dot = dot_precision()
    return dict(BK=_pow2(K), BV=_pow2(V), BR=64, BT=_key_block(max(K, V), dot), num_warps=8 if wide else 4,
                num_stages=2 if wide else 3, DOT=dot)


def _cols_blocks(blk: dict, K: int, V: int) -> dict:
    """The columns kernel's settings: 32 keys per program for heads wider than 64 (its [keys, K]
    accumulator and the recomputed [rows, keys] blocks spill registers at 64 x 128 on sm_90)."""
    return {**blk, "BT": 32} if max(K, V) > 64 else blk


def _head_stride(*xs) -> int:
    """The per-head stride, in rows, shared by row-contiguous views xs of [B, H, T, *] / [B, H, T]
    tensors (a slice along T of a contiguous tensor qualifies); the kernels index rows with it."""
    strides = set()
    for x in xs:
        inner = x.shape[3] if x.dim() == 4 else 1
        B, H, T = x.shape[:3]
        ok = x.dtype in (torch.float32, chunk.HALF_DOTS.get()) and (T == 1 or x.stride(2) == inner)
        ok = ok and (x.dim() == 3 or inner == 1 or x.stride(3) == 1)
        per_bh = x.stride(1) if H > 1 else (x.stride(0) if B > 1 else None)   # size-1 dims: any stride
        ok = ok and (H == 1 or B == 1 or x.stride(0) == H * x.stride(1))
        ok = ok and (per_bh is None or per_bh % inner == 0)
        if not ok:
            raise ValueError(f"deltaformer triton: expected float32 (or kernel_dots' half) row-contiguous views of "
                             f"[B, H, T, *] tensors, got {x.dtype} shape {tuple(x.shape)} stride {x.stride()}")
        if per_bh is not None:
            strides.add(per_bh // inner)
    if not strides:
        return xs[0].shape[2]
    if len(strides) != 1:
        raise ValueError(f"deltaformer triton: tensors of one side must share the per-head row stride, got {strides}")
    return strides.pop()


def triton_chunk_push(k, lse, bd, rhs, s: int, e: int, scale: float):
    """Same contract as ``chunk.torch_chunk_push`` (in place on rhs); float32, k [B, H, T, K],
    lse [B, H, T], bd [B, H, c, V] (a row slice of a [B, H, T, V] tensor), rhs [B, H, T, V]."""
    _check(k)
    if s == 0:
        return
    B, H, _, K = k.shape
    V = rhs.shape[-1]
    blk = _blocks(K, V)
    kr, lr = k[:, :, s:e], lse[:, :, s:e]
    _push_kernel[(triton.cdiv(s, blk["BT"]), B * H)](kr, lr, bd, k, rhs, e - s, _head_stride(kr, lr, bd), s,
                                                     _head_stride(k, rhs), float(scale), K=K, V=V, **blk)


def triton_key_grads(k, u, lse, bd, bdw, scale: float, chunk_size: int):
    """Same contract as ``chunk.torch_key_grads`` (chunk_size unused: the blocks are the kernel's)."""
    _check(k)
    B, H, T, K = k.shape
    V = u.shape[-1]
    blk = _blocks(K, V)
    dk = torch.empty(k.shape, device=k.device, dtype=torch.float32)     # k may be kernel_dots' half type
    bd, bdw = bd.contiguous(), bdw.contiguous()
    Tr = _head_stride(k, u, lse, bd, bdw, dk)
    args = (k, lse, bd, bdw, k, u, dk, T, Tr, T, Tr, float(scale))
    _dk_rows_kernel[(triton.cdiv(T, blk["BR"]), B * H)](*args, K=K, V=V, CAUSAL=True, ACCUMULATE=False, **blk)
    cblk = _cols_blocks(blk, K, V)
    _dk_cols_kernel[(triton.cdiv(T, cblk["BT"]), B * H)](*args, K=K, V=V, CAUSAL=True, **cblk)
    return dk


def triton_pull(kt, lse_t, bd_t, bdw_t, k, u, rhs, dk, scale: float):
    """Same contract as ``chunk.torch_pull``: later rows kt [B, H, G, K] (lse_t, bd_t, bdw_t) onto
    the keys k / values u [B, H, L, *], in place on rhs and dk (float32; the key side may be row
    slices of larger tensors)."""
    _check(k)
    B, H, L, K = k.shape
    V = u.shape[-1]
    G = kt.shape[2]
    blk = _blocks(K, V)
    kt, lse_t, bd_t, bdw_t = (x.contiguous() for x in (kt, lse_t, bd_t, bdw_t))
    Tr, Tk = _head_stride(kt, lse_t, bd_t, bdw_t), _head_stride(k, u, rhs, dk)
    cblk = _cols_blocks(blk, K, V)
    _push_kernel[(triton.cdiv(L, blk["BT"]), B * H)](kt, lse_t, bd_t, k, rhs, G, Tr, L, Tk, float(scale), K=K, V=V,
                                                     **blk)
    _dk_cols_kernel[(triton.cdiv(L, cblk["BT"]), B * H)](kt, lse_t, bd_t, bdw_t, k, u, dk, G, Tr, L, Tk, float(scale),
                                                         K=K, V=V, CAUSAL=False, **cblk)


def triton_rows_vs_keys(k, lse, bd, bdw, kb, ub, dk, scale: float):
    """Same contract as ``chunk.torch_rows_vs_keys``: rows k [B, H, L, K] against earlier keys kb /
    values ub [B, H, G, *], dk += (float32; the row side may be row slices of larger tensors)."""
    _check(k)
    B, H, L, K = k.shape
    V = ub.shape[-1]
    G = kb.shape[2]
    blk = _blocks(K, V)
    kb, ub = kb.contiguous(), ub.contiguous()
    Tr, Tk = _head_stride(k, lse, bd, bdw, dk), _head_stride(kb, ub)
    _dk_rows_kernel[(triton.cdiv(L, blk["BR"]), B * H)](k, lse, bd, bdw, kb, ub, dk, L, Tr, G, Tk, float(scale), K=K,
                                                        V=V, CAUSAL=False, ACCUMULATE=True, **blk)
