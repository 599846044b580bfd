"""WY stage: the in-chunk cumulative decay gam, Tm = (I + L)^-1 (solve), W = Tm diag(beta Gam) K and
Ut = Tm diag(beta) V (apply), and the backward of both. Math and layout: ``common``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import CHUNK, chunk_map, chunk_prologue, flags_given, n_chunks, pow2


@triton.jit
def _mm(a, b):
    """Small fp32 products inside the triangular solve: exact fp32 (no tf32) on every device."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _inv_unit_lower16(A):
    """(I + A)^-1 for a strictly lower triangular 16x16 fp32 tile, by forward substitution."""
    r = tl.arange(0, 16)
    X = (r[:, None] == r[None, :]).to(tl.float32)
    for i in tl.static_range(1, 16):
        a = tl.sum(tl.where(r[:, None] == i, A, 0.0), axis=0)    # row i of A, indexed by column
        new = tl.sum(a[:, None] * X, axis=0)                      # sum_j a_j X_j (rows j < i)
        X = tl.where(r[:, None] == i, X - new[None, :], X)        # X_i = e_i - sum_j a_j X_j
    return X


@triton.jit
def _ktile(k_ptr, base_tok, t0, T, H, K: tl.constexpr, I: tl.constexpr, k0, BKS: tl.constexpr):
    """Rows t0+16I .. t0+16I+15, columns k0 .. k0+BKS-1 of k (zeros outside)."""
    ri = t0 + I * 16 + tl.arange(0, 16)
    rk = k0 + tl.arange(0, BKS)
    return tl.load(k_ptr + base_tok + ri[:, None] * H * K + rk[None, :],
                   mask=(ri[:, None] < T) & (rk[None, :] < K), other=0.0)


@triton.jit
def _gam16(g_ptr, gam_ptr, base_g, t0, T, H, I: tl.constexpr, offset):
    """In-chunk cumulative g of rows 16I .. 16I+15 (offset = sum of the earlier rows), stored."""
    ri = t0 + I * 16 + tl.arange(0, 16)
    gi = tl.load(g_ptr + base_g + ri * H, mask=ri < T, other=0.0).to(tl.float32)
    gam = tl.cumsum(gi, axis=0) + offset
    tl.store(gam_ptr + base_g + ri * H, gam, mask=ri < T)
    return gam, offset + tl.sum(gi, axis=0)


@triton.jit
def _scale_l(a, bi, gi, gj, I: tl.constexpr, J: tl.constexpr, HAS_G: tl.constexpr):
    """Block (I, J) of L from its k_i.k_j products: beta_i exp(gam_i - gam_j), strictly lower."""
    r = tl.arange(0, 16)
    low = (I * 16 + r)[:, None] > (J * 16 + r)[None, :]
    if HAS_G:
        a = a * tl.exp(tl.where(low, gi[:, None] - gj[None, :], 0.0))
    a = a * bi[:, None]
    if I == J:
        a = tl.where(low, a, 0.0)
    return a


@triton.jit
def _beta16(beta_ptr, base_g, t0, T, H, I: tl.constexpr):
    ri = t0 + I * 16 + tl.arange(0, 16)
    return tl.load(beta_ptr + base_g + ri * H, mask=ri < T, other=0.0).to(tl.float32)


@triton.jit
def _store16(tm_ptr, base_tm, t0, T, H, X, I: tl.constexpr, J: tl.constexpr, C: tl.constexpr):
    ri = t0 + I * 16 + tl.arange(0, 16)
    cj = J * 16 + tl.arange(0, 16)
    tl.store(tm_ptr + base_tm + ri[:, None] * H * C + cj[None, :], X.to(tm_ptr.dtype.element_ty),
             mask=ri[:, None] < T)


@flags_given(HAS_G="g_ptr", HAS_W="beta_ptr", IS_VARLEN="cu_ptr")
@triton.jit
def wy_solve_kernel(k_ptr, beta_ptr, g_ptr, gam_ptr, tm_ptr, cu_ptr, chunks_ptr, T, H,
                    K: tl.constexpr, BKS: tl.constexpr, C: tl.constexpr, HAS_G: tl.constexpr,
                    HAS_W: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Per chunk: gam = in-chunk cumsum of g (stored, fp32); with beta: Tm = (I + L)^-1, stored in
    tm's dtype (the dtype of the products it feeds). L is built in 16x16 blocks from one pass over
    k (BKS columns at a time); the diagonal blocks are inverted by forward substitution and merged
    blockwise in exact fp32. Few warps suit it: the work is 16x16 tiles. Grid (NT, B*H).
    Rows from tend on (the sequence's or document's end) are zeros and not stored."""
    n = tl.program_id(0)
    _, _, _, base_g, _, _, t0, tend = chunk_prologue(n, T, H, C, 1, cu_ptr, chunks_ptr, IS_VARLEN)
    base_tok = base_g * K                   # [B, T, H, K]
    g0 = tl.zeros([16], dtype=tl.float32)
    g1 = g0
    g2 = g0
    g3 = g0
    if HAS_G:
        off = tl.sum(g0, axis=0)
        g0, off = _gam16(g_ptr, gam_ptr, base_g, t0, tend, H, 0, off)
        g1, off = _gam16(g_ptr, gam_ptr, base_g, t0, tend, H, 1, off)
        g2, off = _gam16(g_ptr, gam_ptr, base_g, t0, tend, H, 2, off)
        g3, off = _gam16(g_ptr, gam_ptr, base_g, t0, tend, H, 3, off)
    if HAS_W:
        L00 = tl.zeros([16, 16], dtype=tl.float32)
        L11 = L00
        L22 = L00
        L33 = L00
        L10 = L00
        L20 = L00
        L21 = L00
        L30 = L00
        L31 = L00
        L32 = L00
        for k0 in range(0, K, BKS):
            k_0 = _ktile(k_ptr, base_tok, t0, tend, H, K, 0, k0, BKS)
            k_1 = _ktile(k_ptr, base_tok, t0, tend, H, K, 1, k0, BKS)
            k_2 = _ktile(k_ptr, base_tok, t0, tend, H, K, 2, k0, BKS)
            k_3 = _ktile(k_ptr, base_tok, t0, tend, H, K, 3, k0, BKS)
            L00 = tl.dot(k_0, tl.trans(k_0), L00)
            L11 = tl.dot(k_1, tl.trans(k_1), L11)
            L22 = tl.dot(k_2, tl.trans(k_2), L22)
            L33 = tl.dot(k_3, tl.trans(k_3), L33)
            L10 = tl.dot(k_1, tl.trans(k_0), L10)
            L20 = tl.dot(k_2, tl.trans(k_0), L20)
            L21 = tl.dot(k_2, tl.trans(k_1), L21)
            L30 = tl.dot(k_3, tl.trans(k_0), L30)
            L31 = tl.dot(k_3, tl.trans(k_1), L31)
            L32 = tl.dot(k_3, tl.trans(k_2), L32)
        b0 = _beta16(beta_ptr, base_g, t0, tend, H, 0)
        b1 = _beta16(beta_ptr, base_g, t0, tend, H, 1)
        b2 = _beta16(beta_ptr, base_g, t0, tend, H, 2)
        b3 = _beta16(beta_ptr, base_g, t0, tend, H, 3)
        L00 = _scale_l(L00, b0, g0, g0, 0, 0, HAS_G)
        L11 = _scale_l(L11, b1, g1, g1, 1, 1, HAS_G)
        L22 = _scale_l(L22, b2, g2, g2, 2, 2, HAS_G)
        L33 = _scale_l(L33, b3, g3, g3, 3, 3, HAS_G)
        L10 = _scale_l(L10, b1, g1, g0, 1, 0, HAS_G)
        L20 = _scale_l(L20, b2, g2, g0, 2, 0, HAS_G)
        L21 = _scale_l(L21, b2, g2, g1, 2, 1, HAS_G)
        L30 = _scale_l(L30, b3, g3, g0, 3, 0, HAS_G)
        L31 = _scale_l(L31, b3, g3, g1, 3, 1, HAS_G)
        L32 = _scale_l(L32, b3, g3, g2, 3, 2, HAS_G)
        X00 = _inv_unit_lower16(L00)
        X11 = _inv_unit_lower16(L11)
        X22 = _inv_unit_lower16(L22)
        X33 = _inv_unit_lower16(L33)
        # off-diagonal blocks of the inverse: X_ij = -X_ii sum_{j<=m<i} L_im X_mj
        X10 = -_mm(X11, _mm(L10, X00))
        X21 = -_mm(X22, _mm(L21, X11))
        X20 = -_mm(X22, _mm(L20, X00) + _mm(L21, X10))
        X32 = -_mm(X33, _mm(L32, X22))
        X31 = -_mm(X33, _mm(L31, X11) + _mm(L32, X21))
        X30 = -_mm(X33, _mm(L30, X00) + _mm(L31, X10) + _mm(L32, X20))
        Z = tl.zeros([16, 16], dtype=tl.float32)
        base_tm = base_g * C
        _store16(tm_ptr, base_tm, t0, tend, H, X00, 0, 0, C)
        _store16(tm_ptr, base_tm, t0, tend, H, Z, 0, 1, C)
        _store16(tm_ptr, base_tm, t0, tend, H, Z, 0, 2, C)
        _store16(tm_ptr, base_tm, t0, tend, H, Z, 0, 3, C)
        _store16(tm_ptr, base_tm, t0, tend, H, X10, 1, 0, C)
        _store16(tm_ptr, base_tm, t0, tend, H, X11, 1, 1, C)
        _store16(tm_ptr, base_tm, t0, tend, H, Z, 1, 2, C)
        _store16(tm_ptr, base_tm, t0, tend, H, Z, 1, 3, C)
        _store16(tm_ptr, base_tm, t0, tend, H, X20, 2, 0, C)
        _store16(tm_ptr, base_tm, t0, tend, H, X21, 2, 1, C)
        _store16(tm_ptr, base_tm, t0, tend, H, X22, 2, 2, C)
        _store16(tm_ptr, base_tm, t0, tend, H, Z, 2, 3, C)
        _store16(tm_ptr, base_tm, t0, tend, H, X30, 3, 0, C)
        _store16(tm_ptr, base_tm, t0, tend, H, X31, 3, 1, C)
        _store16(tm_ptr, base_tm, t0, tend, H, X32, 3, 2, C)
        _store16(tm_ptr, base_tm, t0, tend, H, X33, 3, 3, C)


@triton.jit
def _tm_tile(tm_ptr, base_g, rt, mt, H, C: tl.constexpr):
    """The chunk's [C, C] Tm (rows rt, zeros past T), as wy_solve_kernel stored it."""
    rc = tl.arange(0, C)
    return tl.load(tm_ptr + base_g * C + rt[:, None] * H * C + rc[None, :], mask=mt[:, None], other=0.0)


@flags_given(HAS_G="gam_ptr", HAS_V="v_ptr", IS_VARLEN="cu_ptr")
@triton.jit
def wy_apply_kernel(k_ptr, v_ptr, beta_ptr, gam_ptr, tm_ptr, w_ptr, u_ptr, cu_ptr, chunks_ptr,
                    T, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    C: tl.constexpr, HAS_G: tl.constexpr, HAS_V: tl.constexpr,
                    IS_VARLEN: tl.constexpr):
    """W = Tm diag(beta Gam) K and (HAS_V) Ut = Tm diag(beta) V, BK / BV columns at a time.
    Grid (NT, B*H)."""
    n = tl.program_id(0)
    _, _, _, base_g, rt, mt, _, _ = chunk_prologue(n, T, H, C, 1, cu_ptr, chunks_ptr, IS_VARLEN)
    tm = _tm_tile(tm_ptr, base_g, rt, mt, H, C)
    beta = tl.load(beta_ptr + base_g + rt * H, mask=mt, other=0.0).to(tl.float32)
    kscale = beta
    if HAS_G:
        kscale = beta * tl.exp(tl.load(gam_ptr + base_g + rt * H, mask=mt, other=0.0))
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mtk = mt[:, None] & (rk[None, :] < K)
        kc = tl.load(k_ptr + base_g * K + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
        kb = (kc.to(tl.float32) * kscale[:, None]).to(kc.dtype)
        w = tl.dot(tm.to(kc.dtype), kb)
        tl.store(w_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                 w.to(w_ptr.dtype.element_ty), mask=mtk)
    if HAS_V:
        for v0 in range(0, V, BV):
            rv = v0 + tl.arange(0, BV)
            mtv = mt[:, None] & (rv[None, :] < V)
            vc = tl.load(v_ptr + base_g * V + rt[:, None] * H * V + rv[None, :], mask=mtv, other=0.0)
            vb = (vc.to(tl.float32) * beta[:, None]).to(vc.dtype)
            u = tl.dot(tm.to(vc.dtype), vb)
            tl.store(u_ptr + base_g * V + rt[:, None] * H * V + rv[None, :],
                     u.to(u_ptr.dtype.element_ty), mask=mtv)


@flags_given(HAS_G="gam_ptr", IS_VARLEN="cu_ptr", HAS_DX="dx_ptr", HAS_DVADD="dvadd_ptr")
@triton.jit
def wy_bwd_kernel(k_ptr, v_ptr, beta_ptr, gam_ptr, tm_ptr, dw_ptr, du_ptr, dk_ptr, dgam_ptr,
                  dv_ptr, dbeta_ptr, dg_ptr, cu_ptr, chunks_ptr, dx_ptr, dvadd_ptr, dkout_ptr,
                  T, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  C: tl.constexpr, HAS_G: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DX: tl.constexpr,
                  HAS_DVADD: tl.constexpr):
    """Backward of W = Tm diag(beta Gam) K, Ut = Tm diag(beta) V through Tm = (I + L)^-1:
        dR = Tm^T [dW | dU],  dL = -strict_lower(dR [W | Ut]^T),
    then dk (completed in place over the partial dk of dqk_kernel), dv, dbeta and dgam (finished
    into dg by an in-chunk suffix sum). Grid (NT, B*H).

    K and V are walked in BK / BV column blocks so that only [C, C] accumulators (dL, K K^T) stay
    live; the products take the inputs' dtype with fp32 accumulation. dk needs the whole dL, so
    its K blocks are visited twice (the second visit recomputes Tm^T dW, one small product).

    HAS_DX: also the gradient dX of X = Tm diag(beta) itself ([B, T, H, C] fp32, a chunk's [C, C] per
    row block; the log-linear ops use X in their masked intra-chunk matrix): the U term with V = I,
    dR = Tm^T dX, dL -= dR X^T, dbeta_s += sum_t Tm[t, s] dX[t, s].

    HAS_DVADD: dv = (the WY part) + dvadd (fp32, the caller's other share of dv) before the one rounding to
    dv's dtype; dkout: where the completed dk goes, in its dtype (dk_ptr itself for in place). Both spare the
    caller an fp32 [B, T, H, D] add and cast afterwards."""
    n = tl.program_id(0)
    _, _, _, base_g, rt, mt, _, _ = chunk_prologue(n, T, H, C, 1, cu_ptr, chunks_ptr, IS_VARLEN)
    tm = _tm_tile(tm_ptr, base_g, rt, mt, H, C).to(k_ptr.dtype.element_ty)
    tmt = tl.trans(tm)
    beta = tl.load(beta_ptr + base_g + rt * H, mask=mt, other=0.0).to(tl.float32)
    if HAS_G:
        gam = tl.load(gam_ptr + base_g + rt * H, mask=mt, other=0.0)
        eg = tl.exp(gam)
    else:
        eg = tl.full([C], 1.0, dtype=tl.float32)
    kscale = beta * eg
    dl = tl.zeros([C, C], dtype=tl.float32)
    kkt = tl.zeros([C, C], dtype=tl.float32)
    kdr = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mtk = mt[:, None] & (rk[None, :] < K)
        kc = tl.load(k_ptr + base_g * K + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
        dwc = tl.load(dw_ptr + base_g * K + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
        w = tl.dot(tm, (kc.to(tl.float32) * kscale[:, None]).to(kc.dtype))
        drw = tl.dot(tmt, dwc.to(kc.dtype))
        dl -= tl.dot(drw.to(kc.dtype), tl.trans(w.to(kc.dtype)))
        kdr += tl.sum(kc.to(tl.float32) * drw, axis=1)
        kkt = tl.dot(kc, tl.trans(kc), kkt)
    dbeta = kdr * eg
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        mtv = mt[:, None] & (rv[None, :] < V)
        vc = tl.load(v_ptr + base_g * V + rt[:, None] * H * V + rv[None, :], mask=mtv, other=0.0)
        duc = tl.load(du_ptr + base_g * V + rt[:, None] * H * V + rv[None, :], mask=mtv, other=0.0)
        vf = vc.to(tl.float32)
        ut = tl.dot(tm, (vf * beta[:, None]).to(vc.dtype))
        dru = tl.dot(tmt, duc.to(vc.dtype))
        dvc = dru * beta[:, None]
        if HAS_DVADD:
            dvc += tl.load(dvadd_ptr + base_g * V + rt[:, None] * H * V + rv[None, :], mask=mtv, other=0.0)
        tl.store(dv_ptr + base_g * V + rt[:, None] * H * V + rv[None, :], dvc.to(dv_ptr.dtype.element_ty), mask=mtv)
        dbeta += tl.sum(dru * vf, axis=1)
        dl -= tl.dot(dru.to(vc.dtype), tl.trans(ut.to(vc.dtype)))
    if HAS_DX:
        rc = tl.arange(0, C)
        dx = tl.load(dx_ptr + base_g * C + rt[:, None] * H * C + rc[None, :], mask=mt[:, None], other=0.0)
        drx = tl.dot(tmt, dx.to(tm.dtype))
        x = (tm.to(tl.float32) * beta[None, :]).to(tm.dtype)
        dl -= tl.dot(drx.to(tm.dtype), tl.trans(x))
        dbeta += tl.sum(tm.to(tl.float32) * dx, axis=0)
    strict = (rt[:, None] > rt[None, :]) & mt[:, None]  # rows past the end load gam 0 (see dqdk)
    if HAS_G:
        e = tl.exp(tl.where(strict, gam[:, None] - gam[None, :], float("-inf")))
    else:
        e = tl.where(strict, 1.0, 0.0)
    zk = dl * e                                            # dL/d(k_i.k_j) / beta_i
    gmat = zk * kkt
    dbeta += tl.sum(gmat, axis=1)
    zb = (zk * beta[:, None]).to(k_ptr.dtype.element_ty)
    zbt = tl.trans(zb)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mtk = mt[:, None] & (rk[None, :] < K)
        kc = tl.load(k_ptr + base_g * K + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
        dwc = tl.load(dw_ptr + base_g * K + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
        dk = tl.load(dk_ptr + base_g * K + rt[:, None] * H * K + rk[None, :], mask=mtk,
                     other=0.0).to(tl.float32)
        drw = tl.dot(tmt, dwc.to(kc.dtype))
        dk += drw * kscale[:, None] + tl.dot(zb, kc) + tl.dot(zbt, kc)
        tl.store(dkout_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                 dk.to(dkout_ptr.dtype.element_ty), mask=mtk)
    tl.store(dbeta_ptr + base_g + rt * H, dbeta.to(dbeta_ptr.dtype.element_ty), mask=mt)
    if HAS_G:
        zg = gmat * beta[:, None]
        dgam = tl.load(dgam_ptr + base_g + rt * H, mask=mt, other=0.0)
        dgam += kscale * kdr + tl.sum(zg, axis=1) - tl.sum(zg, axis=0)
        dgam = tl.where(mt, dgam, 0.0)
        dg = tl.sum(dgam, axis=0) - tl.cumsum(dgam, axis=0) + dgam
        tl.store(dg_ptr + base_g + rt * H, dg.to(dg_ptr.dtype.element_ty), mask=mt)


def wy_solve(k, g, beta, cfg, varlen=None):
    """gam (fp32 in-chunk cumsum of g, or None) and Tm = (I + L)^-1 per chunk (k's dtype, or None);
    with ``varlen`` (common.Varlen) the chunks are the documents' own."""
    B, T, H, K = k.shape
    if g is None and beta is None:
        return None, None
    gam = torch.empty(B, T, H, device=k.device, dtype=torch.float32) if g is not None else None
    tm = torch.empty(B, T, H, CHUNK, device=k.device, dtype=k.dtype) if beta is not None else None
    wy_solve_kernel[(n_chunks(T, varlen), B * H)](k, beta, g, gam, tm, *chunk_map(varlen), T, H, K=K,
                                                  BKS=min(cfg.BK, cfg.BKS), C=CHUNK,
                                                  **cfg.launch("wy_solve"))
    return gam, tm


def wy_apply(k, v, beta, gam, tm, cfg, want_u: bool = True, varlen=None):
    """W = Tm diag(beta Gam) K and (want_u) Ut = Tm diag(beta) V; (None, None) without beta."""
    if tm is None:
        return None, None
    B, T, H, K = k.shape
    w = torch.empty_like(k)
    u = torch.empty_like(v) if want_u else None
    V = v.shape[-1] if want_u else 16
    wy_apply_kernel[(n_chunks(T, varlen), B * H)](k, v if want_u else None, beta, gam, tm, w, u,
                                                  *chunk_map(varlen), T, H, K=K, V=V,
                                                  BK=min(cfg.BK, cfg.BKW), BV=cfg.BVW, C=CHUNK,
                                                  **cfg.launch("wy_apply"))
    return w, u


def wy_fwd(k, v, g, beta, cfg, want_u: bool = True, varlen=None):
    """gam, Tm, W, Ut (None where not applicable)."""
    gam, tm = wy_solve(k, g, beta, cfg, varlen)
    w, u = wy_apply(k, v, beta, gam, tm, cfg, want_u=want_u and v is not None, varlen=varlen)
    return gam, tm, w, u


def wy_bwd(k, v, beta, gam, tm, dw, du, dk, dgam, cfg, varlen=None, dx=None, dv_add=None, dk_out=None):
    """dv, dbeta, dg (with gam) through the WY transform; completes dk IN PLACE, or into ``dk_out`` (any dtype)
    where given. ``dx``: gradient of X = Tm diag(beta) as well ([B, T, H, C] fp32, see wy_bwd_kernel);
    ``dv_add`` ([B, T, H, V] fp32): added to dv before it is rounded to v's dtype."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dv = torch.empty_like(v)
    dbeta = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    dg = torch.empty(B, T, H, device=k.device, dtype=torch.float32) if gam is not None else None
    wy_bwd_kernel[(n_chunks(T, varlen), B * H)](k, v, beta, gam, tm, dw, du, dk, dgam, dv, dbeta,
                                                dg, *chunk_map(varlen), dx, dv_add,
                                                dk if dk_out is None else dk_out, T, H, K=K, V=V,
                                                BK=min(cfg.BK, cfg.BKB), BV=min(pow2(V), cfg.BVB), C=CHUNK,
                                                  **cfg.launch("wy_bwd"))
    return dv, dbeta, dg
