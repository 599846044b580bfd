"""State passes: the sequential passes over chunks that carry the recurrent state forward (per-chunk
states h, pseudo-values U, final state; under CP also the shard's transition A) and its gradient
backward (dh, full dU, gradient of the initial state). Math and layout: ``common``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import CHUNK, flags_given, n_chunks, sequence_prologue


# NT is not specialised: Triton compiles an int argument equal to 1 as the constant 1, and with one chunk
# (T <= 64, B rows without cu_seqlens) the chunk loop below then has a constant trip count of 1 and is compiled
# as straight-line code (no software pipelining: k / w go through registers into shared memory, then the
# transposed-k wgmma). On an H200 (Triton 3.6, bf16 / fp16 at head dims >= 64, where both dots are wgmma) that
# code gave a wrong final state while o, h, U and every gradient were right (kernel_check 2026-12-01,
# docs/kernels-notes.md). With NT a plain int the one-chunk case runs the looped kernel every other run uses
# (the one that runs one-chunk documents of packed sequences correctly); for NT >= 2 the SASS is unchanged
# (NT's divisibility-by-16 hint changes no instruction: sm_90, Triton 3.6, D=64/128, delta and GDN).
@flags_given(HAS_G="gam_ptr", HAS_W="w_ptr", HAS_S0="s0_ptr", STORE_H="h_ptr", STORE_VNEW="vnew_ptr",
             STORE_ST="st_ptr", STORE_HP="hp_ptr", IS_VARLEN="cu_ptr")
@triton.jit(do_not_specialize=["NT"])
def state_fwd_kernel(k_ptr, w_ptr, u_ptr, gam_ptr, s0_ptr, h_ptr, vnew_ptr, st_ptr, a_ptr, hp_ptr,
                     cu_ptr, seqs_ptr,
                     T, NT, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     C: tl.constexpr, NVB: tl.constexpr,
                     HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_S0: tl.constexpr,
                     STORE_H: tl.constexpr, STORE_VNEW: tl.constexpr, STORE_ST: tl.constexpr,
                     STORE_HP: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Sequential pass over chunks carrying a [K, BV] slice of the state in fp32 registers.

    Stores the incoming state of every chunk (h), the pseudo-values U = Ut - W S (vnew) and the
    final state. Programs with pid0 >= NVB (only where the grid has them) carry a column block of
    the shard transition A = A_NT ... A_1 instead: the same update from S0 = I with Ut = 0. a_ptr is
    always a tensor (a one-element one without A programs): the A store is compiled in every
    specialisation, see ``state_fwd``. With STORE_HP (context parallelism, no varlen) the A programs
    also store their product before every chunk (hp [B, H, NT, K, K], head-major): the h of a pass
    from S_in is the h from zero + hp @ S_in, so the pass can run before S_in is known
    (``state_fwd_prefix``); without it the code is the plain pass's, unchanged.
    With varlen each program runs one document (its own initial and final state, its chunks in
    h numbered from its first chunk's index, the longest documents first). Grid (NVB [+ cdiv(K, BV)], B*H or N*H)."""
    iv = tl.program_id(0)
    bh, h, base_g, bos, eos, nt, c0 = sequence_prologue(T, NT, H, C, cu_ptr, seqs_ptr, IS_VARLEN)
    rc = bos + tl.arange(0, C)   # the rows of the first chunk
    base_k = base_g * K
    base_v = base_g * V
    rk = tl.arange(0, BK)
    mk = rk < K
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
                    mask=(rc[:, None] < eos) & mv[None, :] & (not is_a), other=0.0)
    gam_nxt = tl.zeros([C], dtype=tl.float32)
    gl_nxt = tl.sum(gam_nxt, axis=0)
    if HAS_G:
        gam_nxt = tl.load(gam_ptr + base_g + rc * H, mask=rc < eos, other=0.0)
        gl_nxt = tl.load(gam_ptr + base_g + tl.minimum(bos + C - 1, eos - 1) * H)
    for n in range(0, nt):
        rt = n * C + rc
        mt = rt < eos
        mtv = mt[:, None] & mv[None, :]
        u = u_nxt.to(tl.float32)
        gam = gam_nxt
        gl = gl_nxt
        rt1 = rt + C
        u_nxt = tl.load(u_ptr + base_v + rt1[:, None] * H * V + rv[None, :],
                        mask=(rt1[:, None] < eos) & mv[None, :] & (not is_a), other=0.0)
        if HAS_G:
            gam_nxt = tl.load(gam_ptr + base_g + rt1 * H, mask=rt1 < eos, other=0.0)
            gl_nxt = tl.load(gam_ptr + base_g + tl.minimum(bos + n * C + 2 * C - 1, eos - 1) * H)
        if STORE_HP:
            if STORE_H:
                tl.store(h_ptr + ((c0 + n) * H + h).to(tl.int64) * K * V + rk[:, None] * V + rv[None, :],
                         S.to(h_ptr.dtype.element_ty), mask=mkv & (not is_a))
            tl.store(hp_ptr + (bh * NT + n).to(tl.int64) * K * K + rk[:, None] * K + rv[None, :],
                     S.to(hp_ptr.dtype.element_ty), mask=mkv & is_a)
        elif STORE_H:
            tl.store(h_ptr + ((c0 + n) * H + h).to(tl.int64) * K * V + rk[:, None] * V + rv[None, :],
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


@flags_given(HAS_G="gam_ptr", HAS_W="w_ptr", HAS_DST="dst_ptr", STORE_DH="dh_ptr", STORE_DU="du_ptr",
             COMPUTE_AT="at_ptr", IS_VARLEN="cu_ptr")
@triton.jit
def state_bwd_kernel(q_ptr, k_ptr, w_ptr, do_ptr, dvl_ptr, gam_ptr, dst_ptr, dh_ptr, du_ptr,
                     ds0_ptr, at_ptr, dhp_ptr, cu_ptr, seqs_ptr, scale, T, NT, H, K: tl.constexpr,
                     V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, NVB: tl.constexpr,
                     HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_DST: tl.constexpr,
                     STORE_DH: tl.constexpr, STORE_DU: tl.constexpr, COMPUTE_AT: tl.constexpr,
                     IS_VARLEN: tl.constexpr):
    """Reverse pass over chunks carrying dS (gradient w.r.t. a chunk's outgoing state):
        dU     = dU_local + diag(exp(gl - gam)) K dS            (stored: the full dU)
        dS_in  = exp(gl) dS + scale (Gam Q)^T dO - W^T dU
    Stores dS of every chunk (dh) and the gradient of the initial state; with varlen one document
    per program, as in state_fwd_kernel. With COMPUTE_AT (context parallelism, no varlen, no dst)
    programs with pid0 >= NVB carry a column block of the identity through the same update with
    dO = dU_local = 0 instead: they end with A^T (at [B, H, K, K]) and store the product before
    every chunk (dhp [B, H, NT, K, K], head-major): the dh of a final-state gradient dst is the dh
    from zero + dhp @ dst (``state_bwd_suffix``); without it the code is the plain pass's,
    unchanged. Grid (NVB [+ cdiv(K, BV)], B*H or N*H)."""
    iv = tl.program_id(0)
    bh, h, base_g, bos, eos, nt, c0 = sequence_prologue(T, NT, H, C, cu_ptr, seqs_ptr, IS_VARLEN)
    rc = bos + tl.arange(0, C)   # the rows of the first chunk
    base_k = base_g * K
    base_v = base_g * V
    rk = tl.arange(0, BK)
    mk = rk < K
    if COMPUTE_AT:
        is_a = iv >= NVB
        if is_a:
            rv = (iv - NVB) * BV + tl.arange(0, BV)
            mv = rv < K
            dS = ((rk[:, None] == rv[None, :]) & mv[None, :]).to(tl.float32)
        else:
            rv = iv * BV + tl.arange(0, BV)
            mv = rv < V
            dS = tl.zeros([BK, BV], dtype=tl.float32)
        mio = mv & (not is_a)  # the columns that read dO and dU_local and store dh and dU
    else:
        rv = iv * BV + tl.arange(0, BV)
        mv = rv < V
        mio = mv
        if HAS_DST:
            dS = tl.load(dst_ptr + bh * K * V + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :],
                         other=0.0).to(tl.float32)
        else:
            dS = tl.zeros([BK, BV], dtype=tl.float32)
    mkv = mk[:, None] & mv[None, :]
    # dO, dU_local and the decays are loaded one chunk ahead (see state_fwd_kernel); q, k, w feed
    # the dots directly. The decays and the scale go on the [C, BV] operands, not on q and k.
    r0 = (nt - 1) * C + rc
    do_nxt = tl.load(do_ptr + base_v + r0[:, None] * H * V + rv[None, :],
                     mask=(r0[:, None] < eos) & mio[None, :], other=0.0)
    du_nxt = tl.load(dvl_ptr + base_v + r0[:, None] * H * V + rv[None, :],
                     mask=(r0[:, None] < eos) & mio[None, :], other=0.0)
    gam_nxt = tl.zeros([C], dtype=tl.float32)
    gl_nxt = tl.sum(gam_nxt, axis=0)
    if HAS_G:
        gam_nxt = tl.load(gam_ptr + base_g + r0 * H, mask=r0 < eos, other=0.0)
        gl_nxt = tl.load(gam_ptr + base_g + (eos - 1) * H)
    for i in range(0, nt):
        n = nt - 1 - i
        rt = n * C + rc
        mt = rt < eos
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mio[None, :]
        do = do_nxt.to(tl.float32)
        du = du_nxt.to(tl.float32)
        gam = gam_nxt
        gl = gl_nxt
        rt1 = rt - C
        m1 = (rt1 >= bos) & (rt1 < eos)
        do_nxt = tl.load(do_ptr + base_v + rt1[:, None] * H * V + rv[None, :],
                         mask=m1[:, None] & mio[None, :], other=0.0)
        du_nxt = tl.load(dvl_ptr + base_v + rt1[:, None] * H * V + rv[None, :],
                         mask=m1[:, None] & mio[None, :], other=0.0)
        if HAS_G:
            gam_nxt = tl.load(gam_ptr + base_g + rt1 * H, mask=m1, other=0.0)
            gl_nxt = tl.load(gam_ptr + base_g + (bos + tl.maximum(n * C - 1, 0)) * H)
        if STORE_DH:
            tl.store(dh_ptr + ((c0 + n) * H + h).to(tl.int64) * K * V + rk[:, None] * V + rv[None, :],
                     dS.to(dh_ptr.dtype.element_ty), mask=mk[:, None] & mio[None, :])
        if COMPUTE_AT:
            tl.store(dhp_ptr + (bh * NT + n).to(tl.int64) * K * K + rk[:, None] * K + rv[None, :],
                     dS.to(dhp_ptr.dtype.element_ty), mask=mkv & is_a)
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
    if COMPUTE_AT:
        if is_a:
            tl.store(at_ptr + bh * K * K + rk[:, None] * K + rv[None, :], dS, mask=mkv)
        else:
            tl.store(ds0_ptr + bh * K * V + rk[:, None] * V + rv[None, :], dS, mask=mkv)
    else:
        tl.store(ds0_ptr + bh * K * V + rk[:, None] * V + rv[None, :], dS, mask=mkv)




def state_fwd(k, w, u, gam, s0, cfg, *, store_h: bool, store_vnew: bool, store_final: bool,
              compute_a: bool = False, varlen=None):
    """Per-chunk incoming states h [B, NT, H, K, V] (u's dtype), U = Ut - W S, final state, A.
    With ``varlen`` (a common.Varlen): one pass per document, s0 and the final state [N, H, K, V]."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    NT = n_chunks(T, varlen)
    S = B if varlen is None else varlen.n_docs   # sequences: batch rows, or documents
    h = torch.empty(B, NT, H, K, V, device=k.device, dtype=k.dtype) if store_h else None
    vnew = torch.empty_like(u) if (store_vnew and w is not None) else None
    st = torch.empty(S, H, K, V, device=k.device, dtype=torch.float32) if store_final else None
    # Without A programs a_ptr is a one-element stand-in, not None: with the A store compiled out
    # (None, or is_a a compile-time False) ptxas schedules the chunk loop differently, and the
    # gated forward was 1.6% (None) / 20% (compile-time False) slower on an H200; with the store
    # kept, the loop's SASS is the one-file version's (docs/kernels-notes.md, issue 12).
    a = torch.empty(B, H, K, K, device=k.device, dtype=torch.float32) if compute_a else \
        torch.empty(1, device=k.device, dtype=torch.float32)
    if compute_a and varlen is not None:
        raise ValueError("state_fwd: the CP transition is computed on one document piece, without varlen")
    # with A programs (the CP transition) the pass runs at the CP passes' wider block (BVSC): the
    # identity columns then add no programs, and a program count is what the pass's time follows
    bv, launch = (cfg.BVSC, "state_fwd_cp") if compute_a else (cfg.BVS, "state_fwd")
    nvb = triton.cdiv(V, bv)
    grid = (nvb + (triton.cdiv(K, bv) if compute_a else 0), S * H)
    state_fwd_kernel[grid](k, w, u, gam, s0, h, vnew, st, a, None, *_sequences(varlen), T, NT, H, K=K, V=V,
                           BK=cfg.BK, BV=bv, C=CHUNK, NVB=nvb, **cfg.launch(launch))
    return h, (vnew if vnew is not None else u), st, (a if compute_a else None)


def state_fwd_prefix(k, w, u, gam, cfg):
    """The forward pass from a zero initial state that context parallelism runs before it knows
    the state S_in: per-chunk states h0 and U0 = Ut - W h0 as state_fwd stores them, the final
    state from zero, the transition A and its per-chunk prefix hp [B, H, NT, K, K] (k's dtype), so
    that h = h0 + hp @ S_in, U = U0 - W (hp @ S_in) and the final state is B + A @ S_in."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    NT = n_chunks(T, None)
    h = torch.empty(B, NT, H, K, V, device=k.device, dtype=k.dtype)
    hp = torch.empty(B, H, NT, K, K, device=k.device, dtype=k.dtype)
    vnew = torch.empty_like(u) if w is not None else None
    st = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32)
    a = torch.empty(B, H, K, K, device=k.device, dtype=torch.float32)
    nvb = triton.cdiv(V, cfg.BVSC)
    grid = (nvb + triton.cdiv(K, cfg.BVSC), B * H)
    state_fwd_kernel[grid](k, w, u, gam, None, h, vnew, st, a, hp, None, None, T, NT, H, K=K, V=V,
                           BK=cfg.BK, BV=cfg.BVSC, C=CHUNK, NVB=nvb, **cfg.launch("state_fwd_cp"))
    return h, (vnew if vnew is not None else u), st, a, hp


def state_bwd(q, k, w, do, dvl, gam, dst, scale, cfg, *, store: bool, varlen=None):
    """Reverse pass: dh per chunk, full dU, gradient of the initial state (fp32; [N, H, K, V] with
    ``varlen``)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    NT = n_chunks(T, varlen)
    S = B if varlen is None else varlen.n_docs
    dh = torch.empty(B, NT, H, K, V, device=q.device, dtype=q.dtype) if store else None
    du = torch.empty_like(do) if store else None
    ds0 = torch.empty(S, H, K, V, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(V, cfg.BVSB), S * H)
    state_bwd_kernel[grid](q, k, w, do, dvl, gam, dst, dh, du, ds0, None, None, *_sequences(varlen), scale, T,
                           NT, H, K=K, V=V, BK=cfg.BK, BV=cfg.BVSB, C=CHUNK, NVB=grid[0],
                           **cfg.launch("state_bwd"))
    return dh, du, ds0


def state_bwd_suffix(q, k, w, do, dvl, gam, scale, cfg):
    """The reverse pass from a zero final-state gradient that context parallelism runs before it
    knows that gradient dst: dh0, dU0 and dS_in from zero as state_bwd stores them (dS_in from zero
    is the shard's own state gradient G), A^T and the per-chunk products dhp [B, H, NT, K, K]
    (q's dtype), so that dh = dh0 + dhp @ dst, dU = dU0 + decay * (K (dhp @ dst)) and
    dS_in = G + A^T dst."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    NT = n_chunks(T, None)
    dh = torch.empty(B, NT, H, K, V, device=q.device, dtype=q.dtype)
    dhp = torch.empty(B, H, NT, K, K, device=q.device, dtype=q.dtype)
    du = torch.empty_like(do)
    ds0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    at = torch.empty(B, H, K, K, device=q.device, dtype=torch.float32)
    nvb = triton.cdiv(V, cfg.BVSBC)
    grid = (nvb + triton.cdiv(K, cfg.BVSBC), B * H)
    state_bwd_kernel[grid](q, k, w, do, dvl, gam, None, dh, du, ds0, at, dhp, None, None, scale, T, NT, H, K=K,
                           V=V, BK=cfg.BK, BV=cfg.BVSBC, C=CHUNK, NVB=nvb, **cfg.launch("state_bwd_cp"))
    return dh, du, ds0, at, dhp


def _sequences(varlen):
    """cu_ptr, seqs_ptr of the state kernels: None, None without varlen."""
    return (None, None) if varlen is None else (varlen.cu, varlen.seqs)
