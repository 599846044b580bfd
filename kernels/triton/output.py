"""Output stage: O from the per-chunk states and pseudo-values, and its backward's intra-chunk part
(dU_local = (causal * decay * Q K^T)^T dO, which the backward state pass completes). Math and
layout: ``common``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import CHUNK, chunk_map, chunk_prologue, flags_given, n_chunks


@flags_given(HAS_G="gam_ptr", FIX="hp_ptr", FIX_W="w_ptr", IS_VARLEN="cu_ptr")
@triton.jit
def output_fwd_kernel(q_ptr, k_ptr, vnew_ptr, h_ptr, gam_ptr, o_ptr, hp_ptr, sin_ptr, w_ptr, cu_ptr, chunks_ptr,
                      scale, T, NT, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, C: tl.constexpr, HAS_G: tl.constexpr, FIX: tl.constexpr,
                      FIX_W: tl.constexpr, IS_VARLEN: tl.constexpr):
    """O = scale [diag(Gam) Q S0 + (causal * decay * Q K^T) U], one (V block, chunk) per program.
    With FIX (context parallelism, cp_overlap.py, no varlen) h and U are from a zero initial state
    and S_in arrives separately: Q S0 = Q h + (Q hp_n) S_in and (FIX_W) U = U - (W hp_n) S_in, with
    hp [B, H, NT, K, K] and S_in [B, H, K, V] fp32 (nothing is written back). Grid (cdiv(V, BV),
    NT, B*H)."""
    iv = tl.program_id(0)
    n = tl.program_id(1)
    bh, b, h, base_g, rt, mt, _, _ = chunk_prologue(n, T, H, C, 2, cu_ptr, chunks_ptr, IS_VARLEN)
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    qc = tl.load(q_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                 mask=mt[:, None] & mk[None, :], other=0.0)
    kc = tl.load(k_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                 mask=mt[:, None] & mk[None, :], other=0.0)
    s0 = tl.load(h_ptr + ((b * NT + n) * H + h).to(tl.int64) * K * V + rk[:, None] * V + rv[None, :],
                 mask=mk[:, None] & mv[None, :], other=0.0)
    u = tl.load(vnew_ptr + base_g * V + rt[:, None] * H * V + rv[None, :],
                mask=mt[:, None] & mv[None, :], other=0.0)
    o = tl.dot(qc, s0.to(qc.dtype)).to(tl.float32)
    if FIX:
        hp = tl.load(hp_ptr + (bh * NT + n) * K * K + rk[:, None] * K + rk[None, :],
                     mask=mk[:, None] & mk[None, :], other=0.0)
        sin = tl.load(sin_ptr + bh * K * V + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :],
                      other=0.0).to(qc.dtype)
        o += tl.dot(tl.dot(qc, hp).to(qc.dtype), sin).to(tl.float32)
        if FIX_W:
            wc = tl.load(w_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                         mask=mt[:, None] & mk[None, :], other=0.0)
            whp = tl.dot(wc, hp).to(wc.dtype)
            u = (u.to(tl.float32) - tl.dot(whp, sin.to(wc.dtype)).to(tl.float32)).to(u.dtype)
    a = tl.dot(qc, tl.trans(kc)).to(tl.float32)
    causal = (rt[:, None] >= rt[None, :]) & mt[:, None]  # rows past the end: gam 0, exp(0 - gam_j) overflows
    if HAS_G:
        gam = tl.load(gam_ptr + base_g + rt * H, mask=mt, other=0.0)
        o = o * tl.exp(gam)[:, None]
        a = a * tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
    else:
        a = tl.where(causal, a, 0.0)
    o += tl.dot(a.to(u.dtype), u).to(tl.float32)
    tl.store(o_ptr + base_g * V + rt[:, None] * H * V + rv[None, :],
             (o * scale).to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])

@flags_given(HAS_G="gam_ptr", IS_VARLEN="cu_ptr")
@triton.jit
def dv_local_kernel(q_ptr, k_ptr, do_ptr, gam_ptr, dv_ptr, cu_ptr, chunks_ptr, scale,
                    T, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    C: tl.constexpr, HAS_G: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dU (intra-chunk part) = scale (causal * decay * Q K^T)^T dO. Grid (cdiv(V, BV), NT, B*H)."""
    iv = tl.program_id(0)
    n = tl.program_id(1)
    _, _, _, base_g, rt, mt, _, _ = chunk_prologue(n, T, H, C, 2, cu_ptr, chunks_ptr, IS_VARLEN)
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    qc = tl.load(q_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                 mask=mt[:, None] & mk[None, :], other=0.0)
    kc = tl.load(k_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                 mask=mt[:, None] & mk[None, :], other=0.0)
    do = tl.load(do_ptr + base_g * V + rt[:, None] * H * V + rv[None, :],
                 mask=mt[:, None] & mv[None, :], other=0.0)
    at = tl.dot(kc, tl.trans(qc)).to(tl.float32)          # at[j, i] = k_j . q_i
    causal = (rt[:, None] <= rt[None, :]) & mt[None, :]  # i >= j, row i inside the sequence (see output_fwd)
    if HAS_G:
        gam = tl.load(gam_ptr + base_g + rt * H, mask=mt, other=0.0)
        at = at * tl.exp(tl.where(causal, gam[None, :] - gam[:, None], float("-inf")))
    else:
        at = tl.where(causal, at, 0.0)
    dv = tl.dot(at.to(do.dtype), do).to(tl.float32) * scale
    tl.store(dv_ptr + base_g * V + rt[:, None] * H * V + rv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])




def output_fwd(q, k, vnew, h, gam, scale, cfg, varlen=None, fix=None):
    """o; ``fix`` = (hp, S_in fp32, W or None): h and vnew are from a zero initial state and the
    kernel adds S_in's part itself (see output_fwd_kernel)."""
    B, T, H, K = q.shape
    V = vnew.shape[-1]
    NT = n_chunks(T, varlen)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(V, cfg.BVO), NT, B * H)
    hp, sin, w = (None, None, None) if fix is None else fix
    output_fwd_kernel[grid](q, k, vnew, h, gam, o, hp, sin, w, *chunk_map(varlen), scale, T, NT, H, K=K, V=V,
                            BK=cfg.BK, BV=cfg.BVO,
                            C=CHUNK, **cfg.launch("output_fwd"))
    return o


def dv_local(q, k, do, gam, scale, cfg, varlen=None):
    B, T, H, K = q.shape
    V = do.shape[-1]
    NT = n_chunks(T, varlen)
    dvl = torch.empty_like(do)
    grid = (triton.cdiv(V, cfg.BVP), NT, B * H)
    dv_local_kernel[grid](q, k, do, gam, dvl, *chunk_map(varlen), scale, T, H, K=K, V=V, BK=cfg.BK,
                          BV=cfg.BVP, C=CHUNK,
                          **cfg.launch("dv_local"))
    return dvl
