"""Triton kernels of the inter-chunk levels: every level above log2(C) in ONE launch (forward and backward).

Level l > c = log2(C) of the log-linear ops is the run R_l: the base recurrence with its state reset at
every multiple of 2^l, i.e. at every chunk index that is a multiple of 2^(l-c). Its intra-chunk part is
done elsewhere (``fused.py``: one masked pass for all levels); what is left per level is the chunk-level
state scan and its readout,

    o_t   += scale * w_l[t] * qt_t^T S_l(n)                  (t in chunk n)
    S_l(n+1) = 0 if chunk n+1 starts a block of level l, else
               exp(gl) S_l(n) + K^T diag(exp(gl - gam)) (Ut - W S_l(n))

with the effective queries qt = diag(Gam) Q - (causal * decay * Q K^T) W (qt_t^T S = q_t^T A_t...A_t0 S:
the query carried back to the chunk start), W, Ut the WY terms (Mamba-2: W = 0, Ut = V), gam the in-chunk
cumulative log-decay, w_l = lambda_l - lambda_{l+1} (the top level: lambda_top). All levels read the same
per-chunk tiles: one program per (V block, batch x head, level), levels on the fastest-changing axis of
the launch, so the programs of one head run side by side and share those tiles through L2 instead of one
pass per level over the whole sequence. The outputs of the levels are summed with fp32 atomics.

The backward recomputes the per-chunk states of a group of levels (``levels_fwd_kernel`` storing them),
then runs the reverse scan (``levels_bwd_kernel``) carrying dS_l, adding every level's share of dqt, dk,
dW, dUt, dgam and d w_l with fp32 atomics. Groups bound the stored states to ``STATE_BUDGET`` bytes.

Layout as in ``kernels/triton``: tokens [B, T, H, D] contiguous, gam and w as [B, T, H] / [B, T, H, NL]
fp32, states [B, H, NL, K, V] fp32. ``n0`` is the global chunk index of the first chunk (position_offset
/ C); a level whose block begins before the call starts from its run state in ``s0``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton.common import CHUNK, flags_given, pow2

# V block of the level programs (the state tile is [K, BV] fp32) and num_warps.
BV_LEVELS = 32
WARPS_LEVELS = 4
# Bytes of per-chunk states the backward keeps at once (one group of levels); more levels recompute in
# more groups.
STATE_BUDGET = 8 << 30


@flags_given(HAS_W="w_ptr", HAS_S0="s0_ptr", STORE_ST="st_ptr", STORE_H="h_ptr", WRITE_O="o_ptr")
@triton.jit
def levels_fwd_kernel(qt_ptr, k_ptr, w_ptr, u_ptr, gam_ptr, lw_ptr, s0_ptr, o_ptr, st_ptr, h_ptr,
                      scale, B, T, NT, H, NL, n0, j0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, C: tl.constexpr, HAS_W: tl.constexpr, HAS_S0: tl.constexpr,
                      STORE_ST: tl.constexpr, STORE_H: tl.constexpr, WRITE_O: tl.constexpr):
    """Program (level j0 + pid0, V block pid1, batch x head pid2): the scan of one level. Adds its
    readout to o (fp32, atomics), stores its final state (st [B, H, NL, K, V]) and, for the backward,
    its incoming state of every chunk (h [G, B, NT, H, K, V], G = levels of this launch)."""
    jj = tl.program_id(0)
    j = j0 + jj
    iv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    span = 2 << j                          # chunks per block of this level (level c + 1 + j)
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    mkv = mk[:, None] & mv[None, :]
    rc = tl.arange(0, C)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        if n0 % span != 0:
            S = tl.load(s0_ptr + ((bh * NL + j) * K + rk[:, None]) * V + rv[None, :], mask=mkv, other=0.0)
    for n in range(0, NT):
        keep = ((n0 + n) % span != 0) | (n == 0)
        S = S * keep.to(tl.float32)
        rt = n * C + rc
        mt = rt < T
        if STORE_H:
            tl.store(h_ptr + (((jj * B + b) * NT + n) * H + h) * K * V + rk[:, None] * V + rv[None, :],
                     S.to(h_ptr.dtype.element_ty), mask=mkv)
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        gam = tl.load(gam_ptr + base + rt * H, mask=mt, other=0.0)
        gl = tl.load(gam_ptr + base + tl.minimum(n * C + C - 1, T - 1) * H)
        if WRITE_O:
            qc = tl.load(qt_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            lw = tl.load(lw_ptr + (base + rt * H) * NL + j, mask=mt, other=0.0)
            o = tl.dot(qc, S.to(qc.dtype)).to(tl.float32) * (scale * lw)[:, None]
            tl.atomic_add(o_ptr + (base + rt[:, None] * H) * V + rv[None, :], o, mask=mtv)
        kc = tl.load(k_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        u = tl.load(u_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mtv, other=0.0).to(tl.float32)
        if HAS_W:
            wc = tl.load(w_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            u -= tl.dot(wc, S.to(wc.dtype)).to(tl.float32)
        u = u * tl.exp(gl - gam)[:, None]
        S = S * tl.exp(gl) + tl.dot(tl.trans(kc), u.to(kc.dtype)).to(tl.float32)
    if STORE_ST:
        tl.store(st_ptr + ((bh * NL + j) * K + rk[:, None]) * V + rv[None, :], S, mask=mkv)


@flags_given(HAS_W="w_ptr", HAS_DST="dst_ptr", STORE_DS0="ds0_ptr")
@triton.jit
def levels_bwd_kernel(qt_ptr, k_ptr, w_ptr, u_ptr, gam_ptr, lw_ptr, do_ptr, h_ptr, dst_ptr,
                      dqt_ptr, dk_ptr, dw_ptr, du_ptr, dgam_ptr, dlw_ptr, ds0_ptr,
                      scale, B, T, NT, H, NL, n0, j0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, C: tl.constexpr, HAS_W: tl.constexpr, HAS_DST: tl.constexpr,
                      STORE_DS0: tl.constexpr):
    """Reverse scan of one level (program as in ``levels_fwd_kernel``), dS = gradient of the state
    leaving chunk n, S = its incoming state (from h):
        dU     = diag(exp(gl - gam)) K dS                        -> dUt += dU, dW -= dU S^T
        dK    += diag(exp(gl - gam)) (Ut - W S) dS^T
        dgam  += -rowsum(dU * U), last row + sum(dU * U) + exp(gl) <S, dS>
        dqt   += scale diag(w) dO S^T,   dw_l += scale rowsum(dO * (qt S))
        dS_in  = exp(gl) dS - W^T dU + scale qt^T diag(w) dO,  cut to 0 where the chunk starts a block.
    Everything but d initial state is summed over levels and V blocks with fp32 atomics."""
    jj = tl.program_id(0)
    j = j0 + jj
    iv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    span = 2 << j
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    mkv = mk[:, None] & mv[None, :]
    rc = tl.arange(0, C)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DST:
        dS = tl.load(dst_ptr + ((bh * NL + j) * K + rk[:, None]) * V + rv[None, :], mask=mkv, other=0.0)
    for i in range(0, NT):
        n = NT - 1 - i
        rt = n * C + rc
        mt = rt < T
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        S = tl.load(h_ptr + (((jj * B + b) * NT + n) * H + h) * K * V + rk[:, None] * V + rv[None, :],
                    mask=mkv, other=0.0).to(tl.float32)
        last = tl.minimum(n * C + C - 1, T - 1)
        gam = tl.load(gam_ptr + base + rt * H, mask=mt, other=0.0)
        gl = tl.load(gam_ptr + base + last * H)
        dec = tl.exp(gl - gam)
        qc = tl.load(qt_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        kc = tl.load(k_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        lw = tl.load(lw_ptr + (base + rt * H) * NL + j, mask=mt, other=0.0)
        do = tl.load(do_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mtv, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mtv, other=0.0).to(tl.float32)
        if HAS_W:
            wc = tl.load(w_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            u -= tl.dot(wc, S.to(wc.dtype)).to(tl.float32)
        du = tl.dot(kc, dS.to(kc.dtype)).to(tl.float32) * dec[:, None]
        tl.atomic_add(du_ptr + (base + rt[:, None] * H) * V + rv[None, :], du, mask=mtv)
        St = tl.trans(S)
        dSt = tl.trans(dS)
        if HAS_W:
            tl.atomic_add(dw_ptr + (base + rt[:, None] * H) * K + rk[None, :],
                          -tl.dot(du.to(wc.dtype), St.to(wc.dtype)).to(tl.float32), mask=mtk)
        dk = tl.dot((u * dec[:, None]).to(kc.dtype), dSt.to(kc.dtype)).to(tl.float32)
        tl.atomic_add(dk_ptr + (base + rt[:, None] * H) * K + rk[None, :], dk, mask=mtk)
        a = tl.sum(du * u, axis=1)
        dgam = tl.where(rt == last, tl.sum(a, axis=0) + tl.exp(gl) * tl.sum(tl.sum(S * dS, axis=1), axis=0), 0.0)
        tl.atomic_add(dgam_ptr + base + rt * H, dgam - a, mask=mt)
        dow = do * (scale * lw)[:, None]
        tl.atomic_add(dqt_ptr + (base + rt[:, None] * H) * K + rk[None, :],
                      tl.dot(dow.to(qc.dtype), St.to(qc.dtype)).to(tl.float32), mask=mtk)
        qs = tl.dot(qc, S.to(qc.dtype)).to(tl.float32)
        tl.atomic_add(dlw_ptr + (base + rt * H) * NL + j, scale * tl.sum(do * qs, axis=1), mask=mt)
        dS = dS * tl.exp(gl) + tl.dot(tl.trans(qc), dow.to(qc.dtype)).to(tl.float32)
        if HAS_W:
            dS -= tl.dot(tl.trans(wc), du.to(wc.dtype)).to(tl.float32)
        keep = ((n0 + n) % span != 0)
        dS = dS * keep.to(tl.float32)
    if STORE_DS0:
        tl.store(ds0_ptr + ((bh * NL + j) * K + rk[:, None]) * V + rv[None, :], dS, mask=mkv)


def _launch_args(qt, u):
    B, T, H, K = qt.shape
    V = u.shape[-1]
    bv = min(pow2(V), BV_LEVELS)
    return B, T, H, K, V, triton.cdiv(T, CHUNK), bv, triton.cdiv(V, bv)


def levels_forward(o, qt, k, w, ut, gam, lw, s0, scale: float, n0: int, want_final: bool):
    """Adds the readout of every level above log2(C) to o ([B, T, H, V] fp32); returns the final run
    states [B, H, NL, K, V] fp32 (or None)."""
    B, T, H, K, V, NT, bv, nvb = _launch_args(qt, ut)
    NL = lw.shape[-1]
    st = torch.empty(B, H, NL, K, V, device=qt.device, dtype=torch.float32) if want_final else None
    levels_fwd_kernel[(NL, nvb, B * H)](qt, k, w, ut, gam, lw, s0, o, st, None, scale, B, T, NT, H, NL, n0, 0,
                                        K=K, V=V, BK=pow2(K), BV=bv, C=CHUNK, num_warps=WARPS_LEVELS)
    return st


def levels_backward(qt, k, w, ut, gam, lw, s0, do, dst, scale: float, n0: int, need_ds0: bool):
    """Gradients (fp32) of sum(o_inter * do) + sum(final * dst) w.r.t. qt, k, w, ut, gam, lw and s0."""
    B, T, H, K, V, NT, bv, nvb = _launch_args(qt, ut)
    NL = lw.shape[-1]
    f32 = dict(device=qt.device, dtype=torch.float32)
    dqt, dk, du = torch.zeros(B, T, H, K, **f32), torch.zeros(B, T, H, K, **f32), torch.zeros(B, T, H, V, **f32)
    dw = torch.zeros(B, T, H, K, **f32) if w is not None else None
    dgam, dlw = torch.zeros(B, T, H, **f32), torch.zeros(B, T, H, NL, **f32)
    ds0 = torch.zeros(B, H, NL, K, V, **f32) if need_ds0 else None
    per_level = B * NT * H * K * V * qt.element_size()
    group = max(1, min(NL, STATE_BUDGET // max(per_level, 1)))
    do = do.contiguous()
    for j0 in range(0, NL, group):
        G = min(group, NL - j0)
        hs = torch.empty(G, B, NT, H, K, V, device=qt.device, dtype=qt.dtype)
        levels_fwd_kernel[(G, nvb, B * H)](qt, k, w, ut, gam, lw, s0, None, None, hs, scale, B, T, NT, H, NL, n0,
                                           j0, K=K, V=V, BK=pow2(K), BV=bv, C=CHUNK, num_warps=WARPS_LEVELS)
        levels_bwd_kernel[(G, nvb, B * H)](qt, k, w, ut, gam, lw, do, hs, dst, dqt, dk, dw, du, dgam, dlw, ds0,
                                           scale, B, T, NT, H, NL, n0, j0, K=K, V=V, BK=pow2(K), BV=bv, C=CHUNK,
                                           num_warps=WARPS_LEVELS)
        del hs
    return dqt, dk, dw, du, dgam, dlw, ds0
