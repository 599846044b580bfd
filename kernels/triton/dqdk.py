"""dq/dk stage of the backward: dq, the state and intra-chunk parts of dk, dW and the gradient of the
in-chunk cumulative decay, per chunk and K block. Math and layout: ``common``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import CHUNK, chunk_map, chunk_prologue, flags_given, n_chunks, pow2


@flags_given(HAS_G="gam_ptr", HAS_W="du_ptr", IS_VARLEN="cu_ptr")
@triton.jit
def dqk_kernel(q_ptr, k_ptr, vnew_ptr, do_ptr, h_ptr, dh_ptr, du_ptr, gam_ptr,
               dq_ptr, dk_ptr, dw_ptr, dgam_ptr, cu_ptr, chunks_ptr, scale,
               T, NT, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               C: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, IS_VARLEN: tl.constexpr,
               DIRECT_PT: tl.constexpr):
    """Per chunk and BK-column block of K, with S0 = h, dS = dh (outgoing-state gradient),
    U = vnew, dU = du:
        dQ = scale [diag(Gam) dO S0^T + P K],  P = causal * decay * (dO U^T)
        dK = scale P^T Q + diag(exp(gl - gam)) U dS^T,   dW = -dU S0^T
        dgam = rowsum(Q dQ) - rowsum(K dK) + [last row] (exp(gl) <S0, dS> + sum K dK_state)
    Splitting K keeps the three [C, BK] fp32 accumulators in registers (P is recomputed per block,
    a [C, C] product); dgam is linear in the blocks, so each block stores its part in row ikb of
    dgam [NKB, B, T, H] and the caller sums them. Grid (NKB * NT, B*H).
    DIRECT_PT: P^T (for dK) is its own product U dO^T of the loaded tiles instead of tl.trans of P, a
    converted dot result: Triton 3.4 to 3.7.0 miscompile tl.trans of a dot result fed to tl.dot on
    Hopper at some tile shapes (docs/kernels-notes.md, "float16 on GPUs"); one more [C, C] product."""
    NKB: tl.constexpr = (K + BK - 1) // BK
    pid = tl.program_id(0)
    ikb = pid % NKB
    n = pid // NKB
    _, b, h, base_g, rt, mt, t0, tend = chunk_prologue(n, T, H, C, 1, cu_ptr, chunks_ptr, IS_VARLEN)
    rk = ikb * BK + tl.arange(0, BK)
    mk = rk < K
    mtk = mt[:, None] & mk[None, :]
    base_h = ((b * NT + n) * H + h).to(tl.int64) * K * V  # int64: NT * H * K * V passes 2^31 beyond 512K tokens
    dq = tl.zeros([C, BK], dtype=tl.float32)
    dks = tl.zeros([C, BK], dtype=tl.float32)
    dw = tl.zeros([C, BK], dtype=tl.float32)
    da = tl.zeros([C, C], dtype=tl.float32)
    dat = tl.zeros([C, C], dtype=tl.float32)  # (dO U^T)^T, used only with DIRECT_PT
    hdh = tl.zeros([BK], dtype=tl.float32)
    for iv in range(0, tl.cdiv(V, BV)):
        rv = iv * BV + tl.arange(0, BV)
        mv = rv < V
        mtv = mt[:, None] & mv[None, :]
        do = tl.load(do_ptr + base_g * V + rt[:, None] * H * V + rv[None, :], mask=mtv, other=0.0)
        u = tl.load(vnew_ptr + base_g * V + rt[:, None] * H * V + rv[None, :], mask=mtv, other=0.0)
        s0 = tl.load(h_ptr + base_h + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :],
                     other=0.0)
        ds = tl.load(dh_ptr + base_h + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :],
                     other=0.0)
        dq += tl.dot(do, tl.trans(s0.to(do.dtype))).to(tl.float32)
        da += tl.dot(do, tl.trans(u.to(do.dtype))).to(tl.float32)
        if DIRECT_PT:
            dat += tl.dot(u.to(do.dtype), tl.trans(do)).to(tl.float32)
        dks += tl.dot(u, tl.trans(ds.to(u.dtype))).to(tl.float32)
        if HAS_W:
            du = tl.load(du_ptr + base_g * V + rt[:, None] * H * V + rv[None, :], mask=mtv, other=0.0)
            dw -= tl.dot(du, tl.trans(s0.to(du.dtype))).to(tl.float32)
        if HAS_G:
            hdh += tl.sum(s0.to(tl.float32) * ds.to(tl.float32), axis=1)
    qc = tl.load(q_ptr + base_g * K + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
    kc = tl.load(k_ptr + base_g * K + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
    # rows past the sequence's end load gam 0: exp(0 - gam_j) overflows once a chunk decays by > 88,
    # and that inf times their zero dO made dk NaN; masking them keeps the exponent <= 0
    causal = (rt[:, None] >= rt[None, :]) & mt[:, None]
    causal_t = (rt[:, None] <= rt[None, :]) & mt[None, :]  # DIRECT_PT: p^T[j, i] = p[i, j]
    if HAS_G:
        last = tl.minimum(t0 + C - 1, tend - 1)
        gl = tl.load(gam_ptr + base_g + last * H)
        gam = tl.load(gam_ptr + base_g + rt * H, mask=mt, other=0.0)
        p = da * tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf"))) * scale
        if DIRECT_PT:
            pt = dat * tl.exp(tl.where(causal_t, gam[None, :] - gam[:, None], float("-inf"))) * scale
        dq = dq * (tl.exp(gam) * scale)[:, None]
        dks = dks * tl.exp(gl - gam)[:, None]
    else:
        p = tl.where(causal, da, 0.0) * scale
        if DIRECT_PT:
            pt = tl.where(causal_t, dat, 0.0) * scale
        dq = dq * scale
    dq += tl.dot(p.to(kc.dtype), kc).to(tl.float32)
    if DIRECT_PT:
        dk = tl.dot(pt.to(qc.dtype), qc).to(tl.float32) + dks
    else:
        dk = tl.dot(tl.trans(p.to(qc.dtype)), qc).to(tl.float32) + dks
    tl.store(dq_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=mtk)
    tl.store(dk_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=mtk)
    if HAS_W:
        tl.store(dw_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                 dw.to(dw_ptr.dtype.element_ty), mask=mtk)
    if HAS_G:
        kf = kc.to(tl.float32)
        dgam = tl.sum(qc.to(tl.float32) * dq, axis=1) - tl.sum(kf * dk, axis=1)
        last_term = tl.sum(hdh, axis=0) * tl.exp(gl) + tl.sum(tl.sum(kf * dks, axis=1), axis=0)
        # gam_last is the cumulative decay of the last valid row: put its gradient there
        dgam += tl.where(rt == last, last_term, 0.0)
        part = ikb * tl.num_programs(1).to(tl.int64) * T    # row ikb of [NKB, B, T, H]
        tl.store(dgam_ptr + part + base_g + rt * H, dgam, mask=mt)




def dqk(q, k, vnew, do, h, dh, du, gam, scale, cfg, varlen=None):
    """dq, the partial dk (state and intra-chunk terms), dW = -dU S0^T (with du), dgam (fp32, with
    gam; the K-block parts summed)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    NT = n_chunks(T, varlen)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dw = torch.empty_like(k) if du is not None else None
    bk = min(cfg.BK, cfg.BKD)
    nkb = triton.cdiv(K, bk)
    dgam = torch.empty(nkb, B, T, H, device=k.device, dtype=torch.float32) if gam is not None else None
    dqk_kernel[(nkb * NT, B * H)](q, k, vnew, do, h, dh, du, gam, dq, dk, dw, dgam,
                                  *chunk_map(varlen), scale, T, NT, H, K=K, V=V, BK=bk,
                                  BV=min(pow2(V), cfg.BVD), C=CHUNK,
                                  DIRECT_PT=bool(cfg.values.get("direct_pt")),
                                  **cfg.launch("dqk"))
    if dgam is not None:
        dgam = dgam.sum(0) if nkb > 1 else dgam[0]
    return dq, dk, dw, dgam
