"""Triton kernels of the levels inside a chunk (0..c, c = log2 C): the masked intra-chunk pass and the
effective queries of the level scans, forward and backward. One program per (chunk, batch x head).

Per chunk (C = 64 tokens aligned to the global positions), with gam the in-chunk cumulative log-decay:

    P    = causal * exp(gam_i - gam_j) * Q K^T                      (diagonal included)
    X    = Tm diag(beta)                     (the WY transform, ``kernels/triton/wy``; Mamba-2: X = I)
    M    = Lambda * (P X),  Lambda[t, s] = lambda[t, level(t, s)]   (level(t, s) <= c inside a chunk)
    o    = scale M V                         (written into the fp32 output the level kernels add to)
    qt   = diag(Gam) Q - P W                 (Mamba-2: diag(Gam) Q): q_t carried back to the chunk start

Backward, given dO and dqt (the level scans' gradient of qt):

    dM = scale dO V^T,  dV = scale M^T dO,  dlambda[t, l] = sum_{s: level(t,s) = l} dM * (P X)
    dP = (Lambda * dM) X^T - dqt W^T,  dX = P^T (Lambda * dM),  dW -= P^T dqt
    dQ = diag(Gam) dqt + (dP * decay) K,  dK += (dP * decay)^T Q
    dgam += rowsum(dP * P) - colsum(dP * P) + rowsum(Q * dqt) * Gam

dX goes to the WY backward (``wy_bwd(..., dx=)``) with dW and dUt. Layout: ``kernels/triton/common``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton.common import CHUNK, flags_given, pow2
from . import triton_levels

BK_INTRA = 64     # K columns per step of the [C, K] products (forward)
BV_INTRA = 64     # V columns per step (forward)
WARPS_INTRA = 4
# the backward's: triton_levels.CONFIG["BK_intra_bwd", "BV_intra_bwd", "warps_intra_bwd", "stages_intra_bwd"]


@triton.jit
def _level_mask(lam_ptr, base, rt, mt, H, L, HI: tl.constexpr, C: tl.constexpr):
    """Lambda [C, C] of one chunk: lambda[t, level(t, s)] on and below the diagonal, 0 above; the level
    inside an aligned chunk is bit_length(i XOR j) of the in-chunk indices."""
    rc = tl.arange(0, C)
    x = rc[:, None] ^ rc[None, :]
    lv = (x > 0).to(tl.int32) + (x > 1).to(tl.int32) + (x > 3).to(tl.int32) + (x > 7).to(tl.int32) \
        + (x > 15).to(tl.int32) + (x > 31).to(tl.int32)
    lam = tl.zeros([C, C], dtype=tl.float32)
    for lev in tl.static_range(0, HI + 1):
        lam_l = tl.load(lam_ptr + (base + rt * H) * L + lev, mask=mt, other=0.0).to(tl.float32)
        lam = tl.where(lv == lev, lam_l[:, None], lam)
    return tl.where(rc[:, None] >= rc[None, :], lam, 0.0), lv


@triton.jit
def _chunk_p(q_ptr, k_ptr, base, rt, mt, gam, H, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr):
    """P = causal * exp(gam_i - gam_j) * Q K^T [C, C] fp32 and its decay factor."""
    a = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mtk = mt[:, None] & (rk[None, :] < K)
        qc = tl.load(q_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        kc = tl.load(k_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        a = tl.dot(qc, tl.trans(kc), a)
    rc = tl.arange(0, C)
    causal = (rc[:, None] >= rc[None, :]) & mt[:, None]  # rows past the end: gam 0 (see triton/dqdk.py)
    decay = tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
    return a * decay, decay


@triton.jit
def _chunk_x(tm_ptr, beta_ptr, base, rt, mt, H, C: tl.constexpr):
    """X = Tm diag(beta) [C, C] fp32 of one chunk."""
    rc = tl.arange(0, C)
    tm = tl.load(tm_ptr + (base + rt[:, None] * H) * C + rc[None, :], mask=mt[:, None], other=0.0)
    beta = tl.load(beta_ptr + base + rt * H, mask=mt, other=0.0).to(tl.float32)
    return tm.to(tl.float32) * beta[None, :]


@flags_given(HAS_W="w_ptr")
@triton.jit
def intra_fwd_kernel(q_ptr, k_ptr, v_ptr, w_ptr, tm_ptr, beta_ptr, gam_ptr, lam_ptr, o_ptr, qt_ptr,
                     scale, T, H, L, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     C: tl.constexpr, HI: tl.constexpr, HAS_W: tl.constexpr):
    """o = scale (Lambda * P X) V (fp32) and qt = diag(Gam) Q - P W (q's dtype). Grid (NT, B*H)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = (bh // H) * T * H + bh % H
    rt = n * C + tl.arange(0, C)
    mt = rt < T
    gam = tl.load(gam_ptr + base + rt * H, mask=mt, other=0.0)
    p, _ = _chunk_p(q_ptr, k_ptr, base, rt, mt, gam, H, K, BK, C)
    lam, _ = _level_mask(lam_ptr, base, rt, mt, H, L, HI, C)
    if HAS_W:
        x = _chunk_x(tm_ptr, beta_ptr, base, rt, mt, H, C)
        m = lam * tl.dot(p, x)
    else:
        m = lam * p
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        mtv = mt[:, None] & (rv[None, :] < V)
        vc = tl.load(v_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mtv, other=0.0)
        o = tl.dot(m.to(vc.dtype), vc).to(tl.float32) * scale
        tl.store(o_ptr + (base + rt[:, None] * H) * V + rv[None, :], o, mask=mtv)
    eg = tl.exp(gam)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mtk = mt[:, None] & (rk[None, :] < K)
        qc = tl.load(q_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        qt = qc.to(tl.float32) * eg[:, None]
        if HAS_W:
            wc = tl.load(w_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            qt -= tl.dot(p.to(wc.dtype), wc).to(tl.float32)
        tl.store(qt_ptr + (base + rt[:, None] * H) * K + rk[None, :], qt.to(qt_ptr.dtype.element_ty), mask=mtk)


@flags_given(HAS_W="w_ptr")
@triton.jit
def intra_bwd_kernel(q_ptr, k_ptr, v_ptr, w_ptr, tm_ptr, beta_ptr, gam_ptr, lam_ptr, do_ptr, dqt_ptr,
                     dv_ptr, dq_ptr, dk_ptr, dw_ptr, dx_ptr, dgam_ptr, dlam_ptr,
                     scale, T, H, L, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     C: tl.constexpr, HI: tl.constexpr, HAS_W: tl.constexpr):
    """The backward above. dv, dq are written; dk, dw, dgam (fp32) are ADDED to (they hold the level
    scans' parts); dx [B, T, H, C] fp32 and dlam's columns 0..HI (dlam [B, T, H, L] fp32 like lam) are written.
    Grid (NT, B*H)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = (bh // H) * T * H + bh % H
    rt = n * C + tl.arange(0, C)
    mt = rt < T
    rc = tl.arange(0, C)
    gam = tl.load(gam_ptr + base + rt * H, mask=mt, other=0.0)
    eg = tl.exp(gam)
    p, decay = _chunk_p(q_ptr, k_ptr, base, rt, mt, gam, H, K, BK, C)
    lam, lv = _level_mask(lam_ptr, base, rt, mt, H, L, HI, C)
    if HAS_W:
        x = _chunk_x(tm_ptr, beta_ptr, base, rt, mt, H, C)
        aeff = tl.dot(p, x)
    else:
        aeff = p
    m = lam * aeff
    dm = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        mtv = mt[:, None] & (rv[None, :] < V)
        vc = tl.load(v_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mtv, other=0.0)
        do = tl.load(do_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mtv, other=0.0)
        dm = tl.dot(do.to(vc.dtype), tl.trans(vc), dm)
        dv = tl.dot(tl.trans(m.to(vc.dtype)), do.to(vc.dtype)).to(tl.float32) * scale
        tl.store(dv_ptr + (base + rt[:, None] * H) * V + rv[None, :], dv, mask=mtv)
    dm = dm * scale
    dma = dm * aeff
    for lev in tl.static_range(0, HI + 1):
        tl.store(dlam_ptr + (base + rt * H) * L + lev,
                 tl.sum(tl.where((lv == lev) & (rc[:, None] >= rc[None, :]), dma, 0.0), axis=1), mask=mt)
    da = lam * dm
    if HAS_W:
        dp = tl.dot(da, tl.trans(x))
        tl.store(dx_ptr + (base + rt[:, None] * H) * C + rc[None, :], tl.dot(tl.trans(p), da), mask=mt[:, None])
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mtk = mt[:, None] & (rk[None, :] < K)
            wc = tl.load(w_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            dqt = tl.load(dqt_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            dp -= tl.dot(dqt.to(wc.dtype), tl.trans(wc)).to(tl.float32)
            dw = tl.load(dw_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            dw -= tl.dot(tl.trans(p.to(wc.dtype)), dqt.to(wc.dtype)).to(tl.float32)
            tl.store(dw_ptr + (base + rt[:, None] * H) * K + rk[None, :], dw, mask=mtk)
    else:
        dp = da
    dpp = dp * p
    dgam = tl.sum(dpp, axis=1) - tl.sum(dpp, axis=0)
    dpd = dp * decay
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mtk = mt[:, None] & (rk[None, :] < K)
        qc = tl.load(q_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        kc = tl.load(k_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        dqt = tl.load(dqt_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        dgam += tl.sum(qc.to(tl.float32) * dqt, axis=1) * eg
        dq = dqt * eg[:, None] + tl.dot(dpd.to(kc.dtype), kc).to(tl.float32)
        tl.store(dq_ptr + (base + rt[:, None] * H) * K + rk[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mtk)
        dk = tl.load(dk_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        dk += tl.dot(tl.trans(dpd.to(qc.dtype)), qc).to(tl.float32)
        tl.store(dk_ptr + (base + rt[:, None] * H) * K + rk[None, :], dk, mask=mtk)
    dgam += tl.load(dgam_ptr + base + rt * H, mask=mt, other=0.0)
    tl.store(dgam_ptr + base + rt * H, dgam, mask=mt)


def _blocks(K, V, bk: int = BK_INTRA, bv: int = BV_INTRA):
    return min(pow2(K), bk), min(pow2(V), bv)


def intra_forward(q, k, v, w, tm, beta, gam, lam, hi: int, scale: float):
    """o (fp32 [B, T, H, V], the levels 0..hi) and qt (q's dtype)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    bk, bv = _blocks(K, V)
    o = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32)
    qt = torch.empty_like(q)
    intra_fwd_kernel[(triton.cdiv(T, CHUNK), B * H)](q, k, v, w, tm, beta, gam, lam, o, qt, scale, T, H,
                                                     lam.shape[-1], K=K, V=V, BK=bk, BV=bv, C=CHUNK, HI=hi,
                                                     num_warps=WARPS_INTRA)
    return o, qt


def intra_backward(q, k, v, w, tm, beta, gam, lam, hi: int, scale: float, do, dqt, dk, dw, dgam, dlam):
    """dv_intra, dq (q's dtype), dX (or None); writes dlam[..., :hi + 1] (dlam fp32, contiguous, lam's shape: the
    levels above are the caller's) and ADDS into dk, dw, dgam (fp32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = triton_levels.CONFIG
    bk, bv = _blocks(K, V, cfg["BK_intra_bwd"], cfg["BV_intra_bwd"])
    dv = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q)
    dx = torch.empty(B, T, H, CHUNK, device=q.device, dtype=torch.float32) if w is not None else None
    assert dlam.shape == lam.shape and dlam.is_contiguous() and dlam.dtype == torch.float32
    intra_bwd_kernel[(triton.cdiv(T, CHUNK), B * H)](q, k, v, w, tm, beta, gam, lam, do, dqt, dv, dq, dk, dw, dx,
                                                     dgam, dlam, scale, T, H, lam.shape[-1], K=K, V=V, BK=bk,
                                                     BV=bv, C=CHUNK, HI=hi, num_warps=cfg["warps_intra_bwd"],
                                                     num_stages=cfg["stages_intra_bwd"])
    return dv, dq, dx
