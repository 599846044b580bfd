"""Triton kernels of the chunkwise delta / gated delta / gated linear attention recurrences.

One set of kernels serves the three mixers through constexpr switches: ``HAS_G`` (a log-decay g is
given), ``HAS_W`` (the delta-rule erase: beta is given, so the WY/UT transform runs). Math and names
follow ``kernels/chunk.py`` (K x V state layout); per chunk of C = 64 tokens with incoming state S0:

    gam = cumsum(g) inside the chunk, Gam = exp(gam), gl = gam of the chunk's last row
    Tm  = (I + L)^-1,  L_ij = beta_i exp(gam_i - gam_j) k_i.k_j  (i > j)
    W   = Tm diag(beta Gam) K,   Ut = Tm diag(beta) V,   U = Ut - W S0        (gla: U = V, W = 0)
    O   = scale [diag(Gam) Q S0 + (causal * exp(gam_i - gam_j) * Q K^T) U]
    S_C = exp(gl) S0 + K^T diag(exp(gl - gam)) U

Every tensor is [B, T, H, D] contiguous (row t of head h at ((b*T + t)*H + h)*D); per-chunk states
are [B, NT, H, K, V]. Rows past T (ragged last chunk) are loaded as zeros (g = beta = 0: identity
steps) and never stored. All pointer arithmetic is plain offsets with masks (no block pointers),
so the kernels run on Triton 3.x and in the interpreter alike.
"""
from __future__ import annotations

import triton
import triton.language as tl

CHUNK = 64  # tokens per chunk; the WY solve below is written for 4 blocks of 16


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


@triton.jit
def wy_solve_kernel(k_ptr, beta_ptr, g_ptr, gam_ptr, tm_ptr, T, H, K: tl.constexpr,
                    BKS: tl.constexpr, C: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr):
    """Per chunk: gam = in-chunk cumsum of g (stored, fp32); with beta: Tm = (I + L)^-1, stored in
    tm's dtype (the dtype of the products it feeds). L is built in 16x16 blocks from one pass over
    k (BKS columns at a time); the diagonal blocks are inverted by forward substitution and merged
    blockwise in exact fp32. Few warps suit it: the work is 16x16 tiles. Grid (NT, B*H)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    t0 = n * C
    base_g = b * T * H + h                  # [B, T, H] scalars
    base_tok = base_g * K                   # [B, T, H, K]
    g0 = tl.zeros([16], dtype=tl.float32)
    g1 = g0
    g2 = g0
    g3 = g0
    if HAS_G:
        off = tl.sum(g0, axis=0)
        g0, off = _gam16(g_ptr, gam_ptr, base_g, t0, T, H, 0, off)
        g1, off = _gam16(g_ptr, gam_ptr, base_g, t0, T, H, 1, off)
        g2, off = _gam16(g_ptr, gam_ptr, base_g, t0, T, H, 2, off)
        g3, off = _gam16(g_ptr, gam_ptr, base_g, t0, T, H, 3, off)
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
            k_0 = _ktile(k_ptr, base_tok, t0, T, H, K, 0, k0, BKS)
            k_1 = _ktile(k_ptr, base_tok, t0, T, H, K, 1, k0, BKS)
            k_2 = _ktile(k_ptr, base_tok, t0, T, H, K, 2, k0, BKS)
            k_3 = _ktile(k_ptr, base_tok, t0, T, H, K, 3, k0, BKS)
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
        b0 = _beta16(beta_ptr, base_g, t0, T, H, 0)
        b1 = _beta16(beta_ptr, base_g, t0, T, H, 1)
        b2 = _beta16(beta_ptr, base_g, t0, T, H, 2)
        b3 = _beta16(beta_ptr, base_g, t0, T, H, 3)
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
        _store16(tm_ptr, base_tm, t0, T, H, X00, 0, 0, C)
        _store16(tm_ptr, base_tm, t0, T, H, Z, 0, 1, C)
        _store16(tm_ptr, base_tm, t0, T, H, Z, 0, 2, C)
        _store16(tm_ptr, base_tm, t0, T, H, Z, 0, 3, C)
        _store16(tm_ptr, base_tm, t0, T, H, X10, 1, 0, C)
        _store16(tm_ptr, base_tm, t0, T, H, X11, 1, 1, C)
        _store16(tm_ptr, base_tm, t0, T, H, Z, 1, 2, C)
        _store16(tm_ptr, base_tm, t0, T, H, Z, 1, 3, C)
        _store16(tm_ptr, base_tm, t0, T, H, X20, 2, 0, C)
        _store16(tm_ptr, base_tm, t0, T, H, X21, 2, 1, C)
        _store16(tm_ptr, base_tm, t0, T, H, X22, 2, 2, C)
        _store16(tm_ptr, base_tm, t0, T, H, Z, 2, 3, C)
        _store16(tm_ptr, base_tm, t0, T, H, X30, 3, 0, C)
        _store16(tm_ptr, base_tm, t0, T, H, X31, 3, 1, C)
        _store16(tm_ptr, base_tm, t0, T, H, X32, 3, 2, C)
        _store16(tm_ptr, base_tm, t0, T, H, X33, 3, 3, C)


@triton.jit
def _tm_tile(tm_ptr, base_g, rt, mt, H, C: tl.constexpr):
    """The chunk's [C, C] Tm (rows rt, zeros past T), as wy_solve_kernel stored it."""
    rc = tl.arange(0, C)
    return tl.load(tm_ptr + base_g * C + rt[:, None] * H * C + rc[None, :], mask=mt[:, None], other=0.0)


@triton.jit
def wy_apply_kernel(k_ptr, v_ptr, beta_ptr, gam_ptr, tm_ptr, w_ptr, u_ptr,
                    T, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    C: tl.constexpr, HAS_G: tl.constexpr, HAS_V: tl.constexpr):
    """W = Tm diag(beta Gam) K and (HAS_V) Ut = Tm diag(beta) V, BK / BV columns at a time.
    Grid (NT, B*H)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    base_g = b * T * H + h
    rt = n * C + tl.arange(0, C)
    mt = rt < T
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


@triton.jit
def state_fwd_kernel(k_ptr, w_ptr, u_ptr, gam_ptr, s0_ptr, h_ptr, vnew_ptr, st_ptr, a_ptr,
                     T, NT, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     C: tl.constexpr, NVB: tl.constexpr,
                     HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_S0: tl.constexpr,
                     STORE_H: tl.constexpr, STORE_VNEW: tl.constexpr, STORE_ST: tl.constexpr,
                     COMPUTE_A: tl.constexpr):
    """Sequential pass over chunks carrying a [K, BV] slice of the state in fp32 registers.

    Stores the incoming state of every chunk (h), the pseudo-values U = Ut - W S (vnew) and the
    final state. Programs with pid0 >= NVB (only when COMPUTE_A) carry a column block of the
    shard transition A = A_NT ... A_1 instead: the same update from S0 = I with Ut = 0.
    Grid (NVB [+ cdiv(K, BV)], B*H)."""
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    base_g = b * T * H + h
    base_k = base_g * K
    base_v = base_g * V
    rk = tl.arange(0, BK)
    mk = rk < K
    rc = tl.arange(0, C)
    is_a = iv >= NVB
    if is_a:
        rv = (iv - NVB) * BV + tl.arange(0, BV)
        mv = rv < K
        S = ((rk[:, None] == rv[None, :]) & mv[None, :]).to(tl.float32)
    else:
        rv = iv * BV + tl.arange(0, BV)
        mv = rv < V
        if HAS_S0:
            S = tl.load(s0_ptr + bh * K * V + rk[:, None] * V + rv[None, :],
                        mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
        else:
            S = tl.zeros([BK, BV], dtype=tl.float32)
    mkv = mk[:, None] & mv[None, :]
    # Loads that are not direct operands of a dot (u, the decays) are issued one chunk ahead, so
    # their latency overlaps the previous chunk's products instead of stalling the state chain;
    # k and w feed the dots directly and are pipelined by the compiler.
    u_nxt = tl.load(u_ptr + base_v + rc[:, None] * H * V + rv[None, :],
                    mask=(rc[:, None] < T) & mv[None, :] & (not is_a), other=0.0)
    gam_nxt = tl.zeros([C], dtype=tl.float32)
    gl_nxt = tl.sum(gam_nxt, axis=0)
    if HAS_G:
        gam_nxt = tl.load(gam_ptr + base_g + rc * H, mask=rc < T, other=0.0)
        gl_nxt = tl.load(gam_ptr + base_g + tl.minimum(C - 1, T - 1) * H)
    for n in range(0, NT):
        rt = n * C + rc
        mt = rt < T
        mtv = mt[:, None] & mv[None, :]
        u = u_nxt.to(tl.float32)
        gam = gam_nxt
        gl = gl_nxt
        rt1 = rt + C
        u_nxt = tl.load(u_ptr + base_v + rt1[:, None] * H * V + rv[None, :],
                        mask=(rt1[:, None] < T) & mv[None, :] & (not is_a), other=0.0)
        if HAS_G:
            gam_nxt = tl.load(gam_ptr + base_g + rt1 * H, mask=rt1 < T, other=0.0)
            gl_nxt = tl.load(gam_ptr + base_g + tl.minimum(n * C + 2 * C - 1, T - 1) * H)
        if STORE_H:
            tl.store(h_ptr + ((b * NT + n) * H + h) * K * V + rk[:, None] * V + rv[None, :],
                     S.to(h_ptr.dtype.element_ty), mask=mkv)
        kc = tl.load(k_ptr + base_k + rt[:, None] * H * K + rk[None, :],
                     mask=mt[:, None] & mk[None, :], other=0.0)
        if HAS_W:
            wc = tl.load(w_ptr + base_k + rt[:, None] * H * K + rk[None, :],
                         mask=mt[:, None] & mk[None, :], other=0.0)
            u = u - tl.dot(wc, S.to(wc.dtype)).to(tl.float32)
            if STORE_VNEW:
                tl.store(vnew_ptr + base_v + rt[:, None] * H * V + rv[None, :],
                         u.to(vnew_ptr.dtype.element_ty), mask=mtv & (not is_a))
        if HAS_G:
            S = S * tl.exp(gl)
            u = u * tl.exp(gl - gam)[:, None]      # the decay on the small operand, not on k
        S += tl.dot(tl.trans(kc), u.to(kc.dtype)).to(tl.float32)
    if is_a:
        tl.store(a_ptr + bh * K * K + rk[:, None] * K + rv[None, :], S, mask=mkv)
    else:
        if STORE_ST:
            tl.store(st_ptr + bh * K * V + rk[:, None] * V + rv[None, :], S, mask=mkv)


@triton.jit
def output_fwd_kernel(q_ptr, k_ptr, vnew_ptr, h_ptr, gam_ptr, o_ptr, scale,
                      T, NT, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, C: tl.constexpr, HAS_G: tl.constexpr):
    """O = scale [diag(Gam) Q S0 + (causal * decay * Q K^T) U], one (V block, chunk) per program.
    Grid (cdiv(V, BV), NT, B*H)."""
    iv = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    base_g = b * T * H + h
    rt = n * C + tl.arange(0, C)
    mt = rt < T
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    qc = tl.load(q_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                 mask=mt[:, None] & mk[None, :], other=0.0)
    kc = tl.load(k_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                 mask=mt[:, None] & mk[None, :], other=0.0)
    s0 = tl.load(h_ptr + ((b * NT + n) * H + h) * K * V + rk[:, None] * V + rv[None, :],
                 mask=mk[:, None] & mv[None, :], other=0.0)
    u = tl.load(vnew_ptr + base_g * V + rt[:, None] * H * V + rv[None, :],
                mask=mt[:, None] & mv[None, :], other=0.0)
    o = tl.dot(qc, s0.to(qc.dtype)).to(tl.float32)
    a = tl.dot(qc, tl.trans(kc)).to(tl.float32)
    causal = rt[:, None] >= rt[None, :]
    if HAS_G:
        gam = tl.load(gam_ptr + base_g + rt * H, mask=mt, other=0.0)
        o = o * tl.exp(gam)[:, None]
        a = a * tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
    else:
        a = tl.where(causal, a, 0.0)
    o += tl.dot(a.to(u.dtype), u).to(tl.float32)
    tl.store(o_ptr + base_g * V + rt[:, None] * H * V + rv[None, :],
             (o * scale).to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])


@triton.jit
def dv_local_kernel(q_ptr, k_ptr, do_ptr, gam_ptr, dv_ptr, scale,
                    T, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    C: tl.constexpr, HAS_G: tl.constexpr):
    """dU (intra-chunk part) = scale (causal * decay * Q K^T)^T dO. Grid (cdiv(V, BV), NT, B*H)."""
    iv = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    base_g = b * T * H + h
    rt = n * C + tl.arange(0, C)
    mt = rt < T
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
    causal = rt[:, None] <= rt[None, :]                   # i >= j
    if HAS_G:
        gam = tl.load(gam_ptr + base_g + rt * H, mask=mt, other=0.0)
        at = at * tl.exp(tl.where(causal, gam[None, :] - gam[:, None], float("-inf")))
    else:
        at = tl.where(causal, at, 0.0)
    dv = tl.dot(at.to(do.dtype), do).to(tl.float32) * scale
    tl.store(dv_ptr + base_g * V + rt[:, None] * H * V + rv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])


@triton.jit
def state_bwd_kernel(q_ptr, k_ptr, w_ptr, do_ptr, dvl_ptr, gam_ptr, dst_ptr, dh_ptr, du_ptr,
                     ds0_ptr, scale, T, NT, H, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                     HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_DST: tl.constexpr,
                     STORE_DH: tl.constexpr, STORE_DU: tl.constexpr):
    """Reverse pass over chunks carrying dS (gradient w.r.t. a chunk's outgoing state):
        dU     = dU_local + diag(exp(gl - gam)) K dS            (stored: the full dU)
        dS_in  = exp(gl) dS + scale (Gam Q)^T dO - W^T dU
    Stores dS of every chunk (dh) and the gradient of the initial state. Grid (cdiv(V, BV), B*H)."""
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    base_g = b * T * H + h
    base_k = base_g * K
    base_v = base_g * V
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    mkv = mk[:, None] & mv[None, :]
    rc = tl.arange(0, C)
    if HAS_DST:
        dS = tl.load(dst_ptr + bh * K * V + rk[:, None] * V + rv[None, :], mask=mkv,
                     other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    # dO, dU_local and the decays are loaded one chunk ahead (see state_fwd_kernel); q, k, w feed
    # the dots directly. The decays and the scale go on the [C, BV] operands, not on q and k.
    r0 = (NT - 1) * C + rc
    do_nxt = tl.load(do_ptr + base_v + r0[:, None] * H * V + rv[None, :],
                     mask=(r0[:, None] < T) & mv[None, :], other=0.0)
    du_nxt = tl.load(dvl_ptr + base_v + r0[:, None] * H * V + rv[None, :],
                     mask=(r0[:, None] < T) & mv[None, :], other=0.0)
    gam_nxt = tl.zeros([C], dtype=tl.float32)
    gl_nxt = tl.sum(gam_nxt, axis=0)
    if HAS_G:
        gam_nxt = tl.load(gam_ptr + base_g + r0 * H, mask=r0 < T, other=0.0)
        gl_nxt = tl.load(gam_ptr + base_g + (T - 1) * H)
    for i in range(0, NT):
        n = NT - 1 - i
        rt = n * C + rc
        mt = rt < T
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        do = do_nxt.to(tl.float32)
        du = du_nxt.to(tl.float32)
        gam = gam_nxt
        gl = gl_nxt
        rt1 = rt - C
        m1 = (rt1 >= 0) & (rt1 < T)
        do_nxt = tl.load(do_ptr + base_v + rt1[:, None] * H * V + rv[None, :],
                         mask=m1[:, None] & mv[None, :], other=0.0)
        du_nxt = tl.load(dvl_ptr + base_v + rt1[:, None] * H * V + rv[None, :],
                         mask=m1[:, None] & mv[None, :], other=0.0)
        if HAS_G:
            gam_nxt = tl.load(gam_ptr + base_g + rt1 * H, mask=m1, other=0.0)
            gl_nxt = tl.load(gam_ptr + base_g + tl.maximum(n * C - 1, 0) * H)
        if STORE_DH:
            tl.store(dh_ptr + ((b * NT + n) * H + h) * K * V + rk[:, None] * V + rv[None, :],
                     dS.to(dh_ptr.dtype.element_ty), mask=mkv)
        kc = tl.load(k_ptr + base_k + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
        qc = tl.load(q_ptr + base_k + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
        kds = tl.dot(kc, dS.to(kc.dtype)).to(tl.float32)
        if HAS_G:
            du += kds * tl.exp(gl - gam)[:, None]
            do = do * (tl.exp(gam) * scale)[:, None]
            dS = dS * tl.exp(gl)
        else:
            du += kds
            do = do * scale
        if STORE_DU:
            tl.store(du_ptr + base_v + rt[:, None] * H * V + rv[None, :],
                     du.to(du_ptr.dtype.element_ty), mask=mtv)
        dS += tl.dot(tl.trans(qc), do.to(qc.dtype)).to(tl.float32)
        if HAS_W:
            wc = tl.load(w_ptr + base_k + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
            dS -= tl.dot(tl.trans(wc), du.to(wc.dtype)).to(tl.float32)
    tl.store(ds0_ptr + bh * K * V + rk[:, None] * V + rv[None, :], dS, mask=mkv)


@triton.jit
def dqk_kernel(q_ptr, k_ptr, vnew_ptr, do_ptr, h_ptr, dh_ptr, du_ptr, gam_ptr,
               dq_ptr, dk_ptr, dw_ptr, dgam_ptr, scale,
               T, NT, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               C: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr):
    """Per chunk and BK-column block of K, with S0 = h, dS = dh (outgoing-state gradient),
    U = vnew, dU = du:
        dQ = scale [diag(Gam) dO S0^T + P K],  P = causal * decay * (dO U^T)
        dK = scale P^T Q + diag(exp(gl - gam)) U dS^T,   dW = -dU S0^T
        dgam = rowsum(Q dQ) - rowsum(K dK) + [last row] (exp(gl) <S0, dS> + sum K dK_state)
    Splitting K keeps the three [C, BK] fp32 accumulators in registers (P is recomputed per block,
    a [C, C] product); dgam is linear in the blocks, so each block stores its part in row ikb of
    dgam [NKB, B, T, H] and the caller sums them. Grid (NKB * NT, B*H)."""
    NKB: tl.constexpr = (K + BK - 1) // BK
    pid = tl.program_id(0)
    ikb = pid % NKB
    n = pid // NKB
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    base_g = b * T * H + h
    rt = n * C + tl.arange(0, C)
    mt = rt < T
    rk = ikb * BK + tl.arange(0, BK)
    mk = rk < K
    mtk = mt[:, None] & mk[None, :]
    base_h = ((b * NT + n) * H + h) * K * V
    dq = tl.zeros([C, BK], dtype=tl.float32)
    dks = tl.zeros([C, BK], dtype=tl.float32)
    dw = tl.zeros([C, BK], dtype=tl.float32)
    da = tl.zeros([C, C], dtype=tl.float32)
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
        dks += tl.dot(u, tl.trans(ds.to(u.dtype))).to(tl.float32)
        if HAS_W:
            du = tl.load(du_ptr + base_g * V + rt[:, None] * H * V + rv[None, :], mask=mtv, other=0.0)
            dw -= tl.dot(du, tl.trans(s0.to(du.dtype))).to(tl.float32)
        if HAS_G:
            hdh += tl.sum(s0.to(tl.float32) * ds.to(tl.float32), axis=1)
    qc = tl.load(q_ptr + base_g * K + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
    kc = tl.load(k_ptr + base_g * K + rt[:, None] * H * K + rk[None, :], mask=mtk, other=0.0)
    causal = rt[:, None] >= rt[None, :]
    if HAS_G:
        last = tl.minimum(n * C + C - 1, T - 1)
        gl = tl.load(gam_ptr + base_g + last * H)
        gam = tl.load(gam_ptr + base_g + rt * H, mask=mt, other=0.0)
        p = da * tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf"))) * scale
        dq = dq * (tl.exp(gam) * scale)[:, None]
        dks = dks * tl.exp(gl - gam)[:, None]
    else:
        p = tl.where(causal, da, 0.0) * scale
        dq = dq * scale
    dq += tl.dot(p.to(kc.dtype), kc).to(tl.float32)
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


@triton.jit
def wy_bwd_kernel(k_ptr, v_ptr, beta_ptr, gam_ptr, tm_ptr, dw_ptr, du_ptr, dk_ptr, dgam_ptr,
                  dv_ptr, dbeta_ptr, dg_ptr,
                  T, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  C: tl.constexpr, HAS_G: tl.constexpr):
    """Backward of W = Tm diag(beta Gam) K, Ut = Tm diag(beta) V through Tm = (I + L)^-1:
        dR = Tm^T [dW | dU],  dL = -strict_lower(dR [W | Ut]^T),
    then dk (completed in place over the partial dk of dqk_kernel), dv, dbeta and dgam (finished
    into dg by an in-chunk suffix sum). Grid (NT, B*H).

    K and V are walked in BK / BV column blocks so that only [C, C] accumulators (dL, K K^T) stay
    live; the products take the inputs' dtype with fp32 accumulation. dk needs the whole dL, so
    its K blocks are visited twice (the second visit recomputes Tm^T dW, one small product)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    base_g = b * T * H + h
    rt = n * C + tl.arange(0, C)
    mt = rt < T
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
        tl.store(dv_ptr + base_g * V + rt[:, None] * H * V + rv[None, :],
                 (dru * beta[:, None]).to(dv_ptr.dtype.element_ty), mask=mtv)
        dbeta += tl.sum(dru * vf, axis=1)
        dl -= tl.dot(dru.to(vc.dtype), tl.trans(ut.to(vc.dtype)))
    strict = rt[:, None] > rt[None, :]
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
        tl.store(dk_ptr + base_g * K + rt[:, None] * H * K + rk[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=mtk)
    tl.store(dbeta_ptr + base_g + rt * H, dbeta.to(dbeta_ptr.dtype.element_ty), mask=mt)
    if HAS_G:
        zg = gmat * beta[:, None]
        dgam = tl.load(dgam_ptr + base_g + rt * H, mask=mt, other=0.0)
        dgam += kscale * kdr + tl.sum(zg, axis=1) - tl.sum(zg, axis=0)
        dgam = tl.where(mt, dgam, 0.0)
        dg = tl.sum(dgam, axis=0) - tl.cumsum(dgam, axis=0) + dgam
        tl.store(dg_ptr + base_g + rt * H, dg.to(dg_ptr.dtype.element_ty), mask=mt)
