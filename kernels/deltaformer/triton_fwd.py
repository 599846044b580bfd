"""Triton statistics of Deltaformer's u-pass: rows against a range of earlier keys.

``_partials_kernel``: for a block of rows (keys k_r) and a range of G earlier keys (k_j, u_j), every
key preceding every row, one program streams the keys flash-attention style and writes the
online-softmax state of its range: running max m, sum l and acc = sum_j exp(S[t, j] - m) u_j with
S = scale k_t . k_j. Ranges are merged by their maxima (``merge_partials``).

- A chunk [s, e) of the single-process u-pass (``triton_chunk_stats``): its rows against the keys
  j < s, split into ranges sized to fill the GPU (late in a long sequence a chunk has few rows but
  up to T earlier keys); ``_finalize_kernel`` merges the ranges, adds the chunk's own strictly
  earlier keys to the normaliser and writes lse, w_prev = P[c, :s] u[:s] and then, with the final
  lse, P[c, c]; ``_intra_probs_kernel`` writes P[c, c] alone from k and lse (what the backward
  recomputes per chunk). ``_chunk_solve_kernel`` then solves the chunk (below). Three launches a
  chunk instead of some forty small torch ops: at 16K tokens the chunk loop is launch-bound
  otherwise.
- Context parallelism (``triton_block_partials``): a rank's rows against a piece of an earlier
  rank's keys and u.

Nothing of size rows x keys is materialised; the partial states are [ranges, rows, V].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import chunk
from .chunk import Stages, merge_partials

NEG = tl.constexpr(chunk.NEG)   # compiled kernels may read globals only when they are constexpr


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a @ b accumulated in float32. DOT "bf16" / "fp16": the operands rounded to that half type
    first (half-precision tensor cores, twice TF32's rate, half the shared memory per tile), like
    flash attention's P @ V; "tf32" / "ieee": float32 operands at that precision."""
    if DOT == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a, b, input_precision=DOT)


@triton.jit
def _partials_kernel(kr_ptr, kk_ptr, uk_ptr, m_ptr, l_ptr, acc_ptr, nrows, Tr, key_hi, Tk, G, NS, scale,
                     K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     BR: tl.constexpr, BT: tl.constexpr, DOT: tl.constexpr):
    """Rows kr[bh, :nrows] (per-head stride Tr rows) against keys kk / uk[bh, range] (stride Tk),
    range = [pid_g G, min(pid_g G + G, key_hi))."""
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    bh = tl.program_id(2)
    r_loc = pid_r * BR + tl.arange(0, BR)
    row_ok = r_loc < nrows
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    kq = tl.load(kr_ptr + bh * Tr * K + r_loc[:, None] * K + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < K),
                 other=0.0)
    m = tl.full([BR], NEG, tl.float32)
    l = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BV], tl.float32)
    j_lo = pid_g * G
    j_hi = tl.minimum(j_lo + G, key_hi)
    for j0 in range(j_lo, j_hi, BT):
        cols = j0 + tl.arange(0, BT)
        col_ok = cols < j_hi
        kj = tl.load(kk_ptr + bh * Tk * K + cols[:, None] * K + dk[None, :], mask=col_ok[:, None] & (dk[None, :] < K),
                     other=0.0)
        sc = _dot(kq, tl.trans(kj), DOT) * scale
        ok = row_ok[:, None] & col_ok[None, :]
        sc = tl.where(ok, sc, NEG)
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.where(ok, tl.exp(sc - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(p, 1)
        uj = tl.load(uk_ptr + bh * Tk * V + cols[:, None] * V + dv[None, :],
                     mask=col_ok[:, None] & (dv[None, :] < V), other=0.0)
        acc = acc * alpha[:, None] + _dot(p, uj, DOT)
        m = m_new
    out = (bh * NS + pid_g) * nrows + r_loc
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)
    tl.store(acc_ptr + out[:, None] * V + dv[None, :], acc, mask=row_ok[:, None] & (dv[None, :] < V))


@triton.jit
def _finalize_kernel(k_ptr, m_ptr, l_ptr, acc_ptr, w_ptr, lse_ptr, p_ptr, s, c, T, NS, scale,
                     K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     BR: tl.constexpr, BT: tl.constexpr, DOT: tl.constexpr):
    """Rows [s, s + c): merge the NS range states, add the strictly earlier keys of the chunk to the
    normaliser, write lse (0 for a row with no key at all) and w_prev = acc / l."""
    pid_r = tl.program_id(0)
    bh = tl.program_id(1)
    r_loc = pid_r * BR + tl.arange(0, BR)
    rows = s + r_loc
    row_ok = r_loc < c
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    m = tl.full([BR], NEG, tl.float32)
    l = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BV], tl.float32)
    for g in range(0, NS):
        at = (bh * NS + g) * c + r_loc
        mg = tl.load(m_ptr + at, mask=row_ok, other=NEG)
        lg = tl.load(l_ptr + at, mask=row_ok, other=0.0)
        ag = tl.load(acc_ptr + at[:, None] * V + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < V), other=0.0)
        m_new = tl.maximum(m, mg)
        a_old = tl.exp(m - m_new)
        a_new = tl.exp(mg - m_new)
        l = l * a_old + lg * a_new
        acc = acc * a_old[:, None] + ag * a_new[:, None]
        m = m_new
    k_base = k_ptr + bh * T * K
    kq = tl.load(k_base + rows[:, None] * K + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < K), other=0.0)
    for j0 in range(s, s + c, BT):                  # the chunk's own keys s <= j < t: normaliser only
        cols = j0 + tl.arange(0, BT)
        kj = tl.load(k_base + cols[:, None] * K + dk[None, :], mask=(cols[:, None] < s + c) & (dk[None, :] < K),
                     other=0.0)
        sc = _dot(kq, tl.trans(kj), DOT) * scale
        ok = row_ok[:, None] & (cols[None, :] < rows[:, None])
        sc = tl.where(ok, sc, NEG)
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(tl.where(ok, tl.exp(sc - m_new[:, None]), 0.0), 1)
        acc = acc * alpha[:, None]
        m = m_new
    has = l > 0
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), 0.0)
    tl.store(lse_ptr + bh * c + r_loc, lse, mask=row_ok)
    tl.store(w_ptr + (bh * c + r_loc)[:, None] * V + dv[None, :], acc / tl.where(has, l, 1.0)[:, None],
             mask=row_ok[:, None] & (dv[None, :] < V))
    _store_intra_probs(k_base, kq, lse, p_ptr, bh, r_loc, s, c, scale, K, BK, BT, DOT)   # P[c, c], lse now final


@triton.jit
def _store_intra_probs(k_base, kq, lse, p_ptr, bh, r_loc, s, c, scale,
                       K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, DOT: tl.constexpr):
    """The rows r_loc (keys kq, row lse) of P[c, c] -> p_ptr [c, c] of head bh (zero for j >= t)."""
    rows = s + r_loc
    row_ok = r_loc < c
    dk = tl.arange(0, BK)
    for j0 in range(s, s + c, BT):
        cols = j0 + tl.arange(0, BT)
        kj = tl.load(k_base + cols[:, None] * K + dk[None, :], mask=(cols[:, None] < s + c) & (dk[None, :] < K),
                     other=0.0)
        sc = _dot(kq, tl.trans(kj), DOT) * scale
        ok = row_ok[:, None] & (cols[None, :] < rows[:, None])
        p = tl.where(ok, tl.exp(tl.where(ok, sc, 0.0) - lse[:, None]), 0.0)
        c_loc = cols - s
        tl.store(p_ptr + (bh * c + r_loc)[:, None] * c + c_loc[None, :], p, mask=row_ok[:, None] & (c_loc[None, :] < c))


@triton.jit
def _intra_probs_kernel(k_ptr, lse_ptr, p_ptr, s, c, T, Tl, scale,
                        K: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr,
                        DOT: tl.constexpr):
    """P[t, j] = exp(scale k_t . k_j - lse_t) for s <= j < t < s + c (zero elsewhere) -> p [c, c];
    lse is read at lse_ptr + bh Tl + (t - s). (The forward writes P[c, c] in ``_finalize_kernel``.)"""
    pid_r = tl.program_id(0)
    bh = tl.program_id(1)
    r_loc = pid_r * BR + tl.arange(0, BR)
    rows = s + r_loc
    row_ok = r_loc < c
    dk = tl.arange(0, BK)
    k_base = k_ptr + bh * T * K
    kq = tl.load(k_base + rows[:, None] * K + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < K), other=0.0)
    lse = tl.load(lse_ptr + bh * Tl + r_loc, mask=row_ok, other=0.0)
    _store_intra_probs(k_base, kq, lse, p_ptr, bh, r_loc, s, c, scale, K, BK, BT, DOT)


@triton.jit
def _chunk_solve_kernel(p_ptr, wp_ptr, beta_ptr, v_ptr, u_ptr, w_ptr, uc_ptr, s, c, T,
                        V: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr, BJ: tl.constexpr,
                        COPY: tl.constexpr):
    """Chunk [s, s + c)'s solve, columns [pid_v BV, +BV) of u, by forward substitution in blocks of
    BS rows: x_t = v_t - beta_t (w_prev_t + sum_{s<=j<t} P[t, j] x_j). The earlier blocks' x are
    read back from u (written by this program, a barrier between blocks; L1 bypassed); inside a
    block a column sweep (BS steps). Also w_t = w_prev_t + sum_j P[t, j] x_j and, with COPY, x in
    uc's dtype. P [c, c] (zero on and above the diagonal) and w_prev [c, V] per head are contiguous."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1)
    dv = pid_v * BV + tl.arange(0, BV)
    v_ok = dv < V
    ri = tl.arange(0, BS)
    p_base = p_ptr + bh * c * c
    for i0 in range(0, c, BS):
        rows = i0 + ri
        row_ok = rows < c
        m2 = row_ok[:, None] & v_ok[None, :]
        acc = tl.load(wp_ptr + (bh * c + rows)[:, None] * V + dv[None, :], mask=m2, other=0.0)
        for j0 in range(0, i0, BJ):                 # the chunk's earlier blocks, solved already
            cols = j0 + tl.arange(0, BJ)
            col_ok = cols < i0
            pij = tl.load(p_base + rows[:, None] * c + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            xj = tl.load(u_ptr + (bh * T + s + cols)[:, None] * V + dv[None, :], mask=col_ok[:, None] & v_ok[None, :],
                         other=0.0, cache_modifier=".cg")
            acc += tl.dot(pij, xj, input_precision="ieee")
        beta = tl.load(beta_ptr + bh * T + s + rows, mask=row_ok, other=0.0)
        x = tl.load(v_ptr + (bh * T + s + rows)[:, None] * V + dv[None, :], mask=m2, other=0.0) - beta[:, None] * acc
        dcols = i0 + ri
        pd = tl.load(p_base + rows[:, None] * c + dcols[None, :], mask=row_ok[:, None] & (dcols < c)[None, :],
                     other=0.0)
        for r in tl.static_range(BS):               # row r is final: take it out of the later rows
            xr = tl.sum(tl.where(ri[:, None] == r, x, 0.0), 0)
            pr = tl.sum(tl.where(ri[None, :] == r, pd, 0.0), 1)
            x -= (beta * pr)[:, None] * xr[None, :]
        out = (bh * T + s + rows)[:, None] * V + dv[None, :]
        tl.store(u_ptr + out, x, mask=m2)
        tl.store(w_ptr + out, acc + tl.dot(pd, x, input_precision="ieee"), mask=m2)
        if COPY:
            tl.store(uc_ptr + out, x.to(uc_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()                          # this block's x is visible to the next blocks


def triton_chunk_solve(p_cc, w_prev, beta, v, u, w, s: int, e: int, u_copy=None):
    """Same contract as ``chunk.torch_chunk_solve``, one launch (a program per head and block of
    value columns) instead of the torch triangular solve and some ten small ops; float32
    throughout (full-precision dots: the substitution compounds rounding). beta [B, H, T], v, u, w,
    u_copy [B, H, T, V] contiguous."""
    B, H, T, V = u.shape
    c = e - s
    for x in (beta, v, u, w) + (() if u_copy is None else (u_copy,)):
        if not x.is_contiguous():
            raise ValueError("deltaformer triton_chunk_solve: beta, v, u, w must be contiguous")
    p_cc, w_prev = p_cc.contiguous(), w_prev.contiguous()
    BV = min(32, _pow2(V))
    _chunk_solve_kernel[(triton.cdiv(V, BV), B * H)](p_cc, w_prev, beta, v, u, w, u if u_copy is None else u_copy,
                                                     s, c, T, V=V, BV=BV, BS=16, BJ=64, COPY=u_copy is not None,
                                                     num_warps=4)


@triton.jit
def _chunk_solve_t_kernel(p_ptr, beta_ptr, r_ptr, dv_ptr, bd_ptr, s, c, T,
                          V: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr, BJ: tl.constexpr):
    """The backward's adjoint solve of chunk [s, s + c), columns [pid_v BV, +BV): back substitution
    in blocks of BS rows from the last, d_t = rhs_t - sum_{t<i<s+c} P[i, t] beta_i d_i; writes
    dv = d and bd = beta d (the later blocks' bd read back, as in ``_chunk_solve_kernel``)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1)
    dv_i = pid_v * BV + tl.arange(0, BV)
    v_ok = dv_i < V
    ri = tl.arange(0, BS)
    p_base = p_ptr + bh * c * c
    nb = tl.cdiv(c, BS)
    for ib in range(0, nb):
        i0 = (nb - 1 - ib) * BS
        rows = i0 + ri
        row_ok = rows < c
        m2 = row_ok[:, None] & v_ok[None, :]
        acc = tl.zeros([BS, BV], tl.float32)
        for j0 in range(i0 + BS, c, BJ):            # the chunk's later rows, solved already
            lat = j0 + tl.arange(0, BJ)
            lat_ok = lat < c
            pji = tl.load(p_base + lat[:, None] * c + rows[None, :], mask=lat_ok[:, None] & row_ok[None, :], other=0.0)
            bdj = tl.load(bd_ptr + (bh * T + s + lat)[:, None] * V + dv_i[None, :],
                          mask=lat_ok[:, None] & v_ok[None, :], other=0.0, cache_modifier=".cg")
            acc += tl.dot(tl.trans(pji), bdj, input_precision="ieee")
        beta = tl.load(beta_ptr + bh * T + s + rows, mask=row_ok, other=0.0)
        out = (bh * T + s + rows)[:, None] * V + dv_i[None, :]
        d = tl.load(r_ptr + out, mask=m2, other=0.0) - acc
        pd = tl.load(p_base + rows[:, None] * c + rows[None, :], mask=row_ok[:, None] & row_ok[None, :], other=0.0)
        for rr in tl.static_range(BS):              # row r is final: take it out of the earlier rows
            r = BS - 1 - rr
            at_r = ri[:, None] == r
            dr = tl.sum(tl.where(at_r, d, 0.0), 0)
            br = tl.sum(tl.where(ri == r, beta, 0.0), 0)
            pr = tl.sum(tl.where(at_r, pd, 0.0), 0)
            d -= pr[:, None] * (br * dr)[None, :]
        tl.store(dv_ptr + out, d, mask=m2)
        tl.store(bd_ptr + out, beta[:, None] * d, mask=m2)
        tl.debug_barrier()                          # this block's bd is visible to the earlier blocks


def triton_chunk_solve_t(p_cc, beta, rhs, dv, bd, s: int, e: int):
    """Same contract as ``chunk.torch_chunk_solve_t``, one launch; float32 throughout. beta [B, H, T],
    rhs, dv, bd [B, H, T, V] contiguous."""
    B, H, T, V = dv.shape
    for x in (beta, rhs, dv, bd):
        if not x.is_contiguous():
            raise ValueError("deltaformer triton_chunk_solve_t: beta, rhs, dv, bd must be contiguous")
    BV = min(32, _pow2(V))
    _chunk_solve_t_kernel[(triton.cdiv(V, BV), B * H)](p_cc.contiguous(), beta, rhs, dv, bd, s, e - s, T, V=V, BV=BV,
                                                       BS=16, BJ=64, num_warps=4)


def dot_precision() -> str:
    """The kernels' dots: half-precision operands ("bf16" / "fp16") inside ``chunk.half_dots(dtype)``
    (``kernel_dots="half"``); otherwise they follow torch's float32 matmul switch: TF32 when
    ``torch.backends.cuda.matmul.allow_tf32`` (``chunk._Tf32Matmuls`` turns it on for bf16 / fp16
    inputs), else full float32 ("ieee"), so float32 inputs get float32 accuracy throughout."""
    half = chunk.HALF_DOTS.get()
    if half is not None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[half]
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _check(k):
    """k in float32, or in the half dtype of ``kernel_dots="half"`` (``chunk.half_dots``)."""
    if k.dtype != torch.float32 and k.dtype != chunk.HALF_DOTS.get():
        raise TypeError(f"deltaformer triton u-pass computes in float32; got k in {k.dtype}")


def _range_len(n_keys: int, programs_per_range: int, BT: int, device: torch.device) -> int:
    """Keys per range: enough ranges for ~4 programs per SM on CUDA, at least 8 key blocks each;
    one key block per range in the interpreter (so the tests cross many ranges)."""
    if device.type != "cuda":
        return BT
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ranges = max(1, -(-4 * sms // programs_per_range))
    per_range = -(-n_keys // ranges)
    return max(8 * BT, -(-per_range // BT) * BT)


def _partials(kr, kk, uk, nrows: int, Tr: int, key_hi: int, Tk: int, scale: float):
    """(m, l, acc) [B, H, NS, nrows(, V)] of the rows kr against keys kk / uk [.., :key_hi]; kr, kk, uk
    are (views of) contiguous [B, H, Tr | Tk, *] float32 tensors starting at their first row / key."""
    B, H = kr.shape[:2]
    K, V = kr.shape[-1], uk.shape[-1]
    BR = min(64, _pow2(nrows))
    dot = dot_precision()
    BT = _key_block(max(K, V), dot)
    row_blocks = triton.cdiv(nrows, BR)
    G = _range_len(key_hi, row_blocks * B * H, BT, kr.device)
    NS = triton.cdiv(key_hi, G)
    m = torch.empty(B, H, NS, nrows, device=kr.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B, H, NS, nrows, V, device=kr.device, dtype=torch.float32)
    _partials_kernel[(row_blocks, NS, B * H)](
        kr, kk, uk, m, l, acc, nrows, Tr, key_hi, Tk, G, NS, float(scale), K=K, V=V, BK=_pow2(K), BV=_pow2(V),
        BR=BR, BT=BT, DOT=dot, num_warps=4 if max(K, V) <= 64 else 8)
    return m, l, acc


def _key_block(width: int, dot: str) -> int:
    """Keys per block: 64, or 32 for heads wider than 64 with float32 operands (their tiles take
    twice the shared memory of half-precision ones)."""
    return 64 if width <= 64 or dot in ("bf16", "fp16") else 32


def _row_blocks(K: int, c: int):
    BR = min(64, _pow2(c))
    dot = dot_precision()
    return dict(BR=BR, BT=_key_block(K, dot), num_warps=4 if K <= 64 else 8, DOT=dot), triton.cdiv(c, BR)


def triton_chunk_probs(k, lse, s: int, e: int, scale: float):
    """Same contract as ``chunk.chunk_probs``: P[c, c] [B, H, c, c] of the chunk [s, e) from k
    [B, H, T, K] (contiguous float32) and the row lse (full [B, H, T], or the chunk's [B, H, c])."""
    _check(k)
    B, H, T, K = k.shape
    c = e - s
    lc = lse[:, :, s:e] if lse.shape[2] == T else lse
    p = torch.empty(B, H, c, c, device=k.device, dtype=torch.float32)
    blk, nb = _row_blocks(K, c)
    _intra_probs_kernel[(nb, B * H)](k, lc, p, s, c, T, lse.shape[2], float(scale), K=K, BK=_pow2(K), **blk)
    return p


def triton_chunk_stats(k: torch.Tensor, u: torch.Tensor, s: int, e: int, scale: float):
    """Same contract as ``chunk.torch_chunk_stats``; k [B, H, T, K], u [B, H, T, V] contiguous float32."""
    _check(k)
    B, H, T, K = k.shape
    V = u.shape[-1]
    c = e - s
    if s:
        m_p, l_p, acc_p = _partials(k[:, :, s:e], k, u, c, T, s, T, scale)
    else:
        m_p = l_p = acc_p = k                       # no earlier keys: NS = 0, nothing is read
    NS = m_p.shape[2] if s else 0
    w = torch.empty(B, H, c, V, device=k.device, dtype=torch.float32)
    lse = torch.empty(B, H, c, device=k.device, dtype=torch.float32)
    p = torch.empty(B, H, c, c, device=k.device, dtype=torch.float32)
    blk, nb = _row_blocks(max(K, V), c)
    _finalize_kernel[(nb, B * H)](k, m_p, l_p, acc_p, w, lse, p, s, c, T, NS, float(scale), K=K, V=V, BK=_pow2(K),
                                  BV=_pow2(V), **blk)
    return w, p, lse


def triton_block_partials(kr, kk, uk, scale: float):
    """Same contract as ``chunk.torch_block_partials``: rows kr [B, H, L, K] against keys kk [B, H, G, K]
    / uk [B, H, G, V] (all earlier), contiguous float32."""
    _check(kr)
    L, G = kr.shape[2], kk.shape[2]
    return merge_partials(*_partials(kr.contiguous(), kk.contiguous(), uk.contiguous(), L, L, G, G, scale))


def triton_stages() -> Stages:
    from .triton_bwd import triton_chunk_push, triton_key_grads, triton_pull, triton_rows_vs_keys
    return Stages(triton_chunk_stats, triton_chunk_probs, triton_chunk_push, triton_key_grads, triton_block_partials,
                  triton_pull, triton_rows_vs_keys, triton_chunk_solve, triton_chunk_solve_t)
