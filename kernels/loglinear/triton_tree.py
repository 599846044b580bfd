"""Triton kernels of the transition tree (``transition_tree``): the levels above the chunk without level scans.

The chunk maps S -> M_n S + B_n are kept as M = e I - N: the decay e = exp(ge) as a log (fp32 scalar per node)
and the delta rule's part N in q's dtype, so the identity never passes through a bf16 rounding (for slow
decays M is close to e I and its information is all in N). A tree over aligned blocks of 2^m chunks, nodes of
level m numbered from off_m = 2P - 2(P >> m) (P = 2^NL chunks, the call padded; NL here is the tree's depth, the
levels its buckets serve: ``transition_tree.tree_depth``, fewer than the call's levels when some hold the whole
call), combines halves a, b:

    ge_p = ge_a + ge_b,   N_p = e_b N_a + e_a N_b - N_b N_a,   Tot_p = e_b Tot_a - N_b Tot_a + Tot_b

(``tree_subtree_fwd_kernel``: level 0 from the chunk's k, W, Ut, gam, and the lowest levels above it,
CONFIG["SUBTREE"], in the same launch; the levels above those CONFIG["SUBTREE_UP"] a launch, by the same kernel from
their stored nodes, or ``tree_level_fwd_kernel`` for one). Chunk n
reads its levels from the buckets of its index: for every bit m of n that is set, ascending,
node i = off_m + (n >> m) - 1,

    o_n += diag(lam_m) (q Tot_i),     q <- e_i q - q N_i      (q starts as qt_n)

(``tree_readout_fwd_kernel``, per chunk). The backward: per chunk, buckets descending
(``tree_readout_bwd_kernel``: dlam, dqt, and the gradient of the query leaving each bucket), per bucket node
the sums over the chunks that read it (``tree_node_grad_kernel``: dTot, dN, dge), down the tree level by
level (``tree_level_bwd_kernel``; its lowest levels in one launch, ``tree_subtree_bwd_kernel``, CONFIG["SUBTREE_BWD"])
and into k, W, Ut, gam (``tree_maps_bwd_kernel``). Every program owns what
it writes: no atomics. Gradients fp32, except the tree's (dN, dTot: in the tree's dtype; dge fp32). The tree's
gradient buffers are not zero-filled (2 GiB at 64K, H=16, D=128): per node a flag says whether anything was written
there before the pass down the tree (``written_flags``: the per-node sums' buckets, and the final states' nodes,
zeroed one by one before their share is added); a node without reads as 0 until the pass has written it, and every
node below the top is written once before it is read.

Layouts: tokens [B, T, H, D]; gam [B, T, H]; lam, dlam [B, T, H, NLW] fp32, the level weights of the NLW levels
above the chunk as the op takes them (lambda, not their differences; scale not included), views into the op's
[B, T, H, L] with row stride LS: bucket m weighs scale lam[m] (the run weights telescope), an incoming level j
scale (lam[j] - lam[j + 1]);
tree [B, H, nodes, K, K|V], ge [B, H, nodes]; qcs / dqcs [NL, B, TH, H, K], TH = ceil(NT / 2) C: at level m only
the chunks n with bit m set have rows, compacted by dropping that bit (``_qcs_at``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton.common import CHUNK, flags_given, pow2
from . import triton_levels
from .triton_levels import cached_work

WARPS = 8


def level_offset(P: int, m: int) -> int:
    """The first node of tree level m (levels side by side: P nodes of level 0, P / 2 of level 1, ...)."""
    return 2 * P - 2 * (P >> m)


@triton.jit
def _offset(P, m):
    """``level_offset`` in a kernel."""
    return 2 * P - 2 * (P >> m)


@triton.jit
def _node(n, m, P):
    """The tree node of chunk n's bucket at level m (bit m of n set). (``_offset`` written out: through the call the
    readout backward compiled differently for sm_90, 252 registers against 250.)"""
    return 2 * P - 2 * (P >> m) + (n >> m) - 1


@triton.jit
def _map_tile(nm_ptr, bh, NPHI, node, K: tl.constexpr, rk, mk, carry):
    """N of a bucket node [BK, BK], as the readout kernels load it (0 where no query is carried across it)."""
    return tl.load(nm_ptr + ((bh * NPHI + node) * K + rk[:, None]) * K + rk[None, :],
                   mask=mk[:, None] & mk[None, :] & carry, other=0.0)


@triton.jit
def _qcs_at(n, m, b, h, B, TH, H, K, rk, C: tl.constexpr):
    """Offsets [C, BK] of chunk n's rows at level m in qcs / dqcs [NL, B, TH, H, K]: bit m of n is set, and the
    chunk's slot is n without that bit (n = hi 2^(m+1) + 2^m + lo -> hi 2^m + lo < NT / 2), so TH = ceil(NT / 2) C
    rows a level hold every chunk that reads a bucket there, half of [T, H, K]."""
    slot = ((n >> (m + 1)) << m) | (n & ((1 << m) - 1))
    rows = slot * C + tl.arange(0, C)
    return ((m * B * TH + b * TH + rows[:, None]) * H + h) * K + rk[None, :]


@triton.jit
def _chunk_program(T, H, K, V, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    """(chunk n, bh, batch b, head h, token offset base, rows rt and their mask, K index and mask, V index and
    mask) of a per-chunk program (grid (chunk, batch x head))."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rt = n * C + tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    return n, bh, b, h, b * T * H + h, rt, rt < T, rk, rk < K, rv, rv < V


@triton.jit
def _chunk_map(k_ptr, w_ptr, u_ptr, gam_ptr, nm_ptr, tot_ptr, ge_ptr, n, bh, T, H, NN, NPHI, K: tl.constexpr,
               V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, HAS_W: tl.constexpr):
    """Level 0 of the tree for chunk n (< P): N = kd^T W, Tot = kd^T Ut, ge = gl with kd = diag(exp(gl - gam)) K
    (padded chunks: N = Tot = 0, gl that of the last token)."""
    b = bh // H
    h = bh % H
    base = b * T * H + h
    rt = n * C + tl.arange(0, C)
    mt = rt < T
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    gam = tl.load(gam_ptr + base + rt * H, mask=mt, other=0.0)
    gl = tl.load(gam_ptr + base + tl.minimum(n * C + C - 1, T - 1) * H)
    d = tl.where(mt, tl.exp(gl - gam), 0.0)
    kc = tl.load(k_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    kd = (kc.to(tl.float32) * d[:, None]).to(kc.dtype)
    uc = tl.load(u_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
    tot = tl.dot(tl.trans(kd), uc.to(kc.dtype))
    tl.store(tot_ptr + ((bh * NN + n) * K + rk[:, None]) * V + rv[None, :], tot.to(tot_ptr.dtype.element_ty),
             mask=mk[:, None] & mv[None, :])
    if HAS_W:
        wc = tl.load(w_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        nm = tl.dot(tl.trans(kd), wc.to(kc.dtype))
    else:
        nm = tl.zeros([BK, BK], dtype=tl.float32)
    tl.store(nm_ptr + ((bh * NPHI + n) * K + rk[:, None]) * K + rk[None, :], nm.to(nm_ptr.dtype.element_ty),
             mask=mk[:, None] & mk[None, :])
    tl.store(ge_ptr + bh * NPHI + n, gl)


@triton.jit
def _halves(a, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """(b = a + 1, K index, V index, [K, V] and [K, K] masks) of a per-node program on the halves a, b."""
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < K
    return a + 1, rk, rv, mk[:, None] & (rv < V)[None, :], mk[:, None] & mk[None, :]


@triton.jit
def _combine_halves(nm_ptr, tot_ptr, ge_ptr, bh, a, p, NN, NPHI, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr):
    """Node p from its halves a, b = a + 1 (N and ge only where p < NPHI: levels some query is carried across)."""
    bn, rk, rv, mkv, mkk = _halves(a, K, V, BK, BV)
    ge_a = tl.load(ge_ptr + bh * NPHI + a)
    ge_b = tl.load(ge_ptr + bh * NPHI + bn)
    nb = tl.load(nm_ptr + ((bh * NPHI + bn) * K + rk[:, None]) * K + rk[None, :], mask=mkk, other=0.0)
    ta = tl.load(tot_ptr + ((bh * NN + a) * K + rk[:, None]) * V + rv[None, :], mask=mkv, other=0.0)
    tb = tl.load(tot_ptr + ((bh * NN + bn) * K + rk[:, None]) * V + rv[None, :], mask=mkv, other=0.0)
    tp = tl.dot(-nb, ta.to(nb.dtype), acc=tl.exp(ge_b) * ta.to(tl.float32) + tb.to(tl.float32))
    tl.store(tot_ptr + ((bh * NN + p) * K + rk[:, None]) * V + rv[None, :], tp.to(tot_ptr.dtype.element_ty), mask=mkv)
    if p < NPHI:
        na = tl.load(nm_ptr + ((bh * NPHI + a) * K + rk[:, None]) * K + rk[None, :], mask=mkk, other=0.0)
        np_ = tl.dot(-nb, na, acc=tl.exp(ge_b) * na.to(tl.float32) + tl.exp(ge_a) * nb.to(tl.float32))
        tl.store(nm_ptr + ((bh * NPHI + p) * K + rk[:, None]) * K + rk[None, :], np_.to(nm_ptr.dtype.element_ty),
                 mask=mkk)
        tl.store(ge_ptr + bh * NPHI + p, ge_a + ge_b)


@flags_given(HAS_W="w_ptr")
@triton.jit
def tree_subtree_fwd_kernel(k_ptr, w_ptr, u_ptr, gam_ptr, nm_ptr, tot_ptr, ge_ptr, T, H, NN, NPHI, P, M0,
                            K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                            HAS_W: tl.constexpr, J: tl.constexpr, MAPS: tl.constexpr):
    """Program (block s of 2^J nodes of level M0, batch x head): with MAPS (M0 = 0) level 0 of its chunks
    (``_chunk_map``) first, else those nodes as stored; then levels M0 + 1 .. M0 + J of the subtree above them, in
    one launch. Each level's nodes are stored before the next level reads them back: a barrier of the program's
    threads between (they are its own recent stores, so mostly L2 hits), in place of a launch per level that reads
    them from DRAM. J = 0: level 0 alone."""
    s = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    if MAPS:
        for c in range(0, 1 << J):
            _chunk_map(k_ptr, w_ptr, u_ptr, gam_ptr, nm_ptr, tot_ptr, ge_ptr, (s << J) + c, bh, T, H, NN, NPHI, K, V,
                       BK, BV, C, HAS_W)
    for mm in tl.static_range(J):
        m = M0 + mm
        tl.debug_barrier()
        for i in range(0, 1 << (J - mm - 1)):
            idx = (s << (J - mm - 1)) + i
            _combine_halves(nm_ptr, tot_ptr, ge_ptr, bh, _offset(P, m) + 2 * idx, _offset(P, m + 1) + idx, NN, NPHI,
                            K, V, BK, BV)


@triton.jit
def tree_level_fwd_kernel(nm_ptr, tot_ptr, ge_ptr, NN, NPHI, OFF, OFF1, K: tl.constexpr, V: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr):
    """Program (node i of level m + 1, batch x head): combine nodes a = OFF + 2i, b = a + 1 of level m into
    p = OFF1 + i (``_combine_halves``)."""
    i = tl.program_id(0)
    _combine_halves(nm_ptr, tot_ptr, ge_ptr, tl.program_id(1).to(tl.int64), OFF + 2 * i, OFF1 + i, NN, NPHI, K, V,
                    BK, BV)


@triton.jit
def _incoming_weight(lam_ptr, j, base, rt, mt, H, NLW, LS):
    """w_j = lam[j] - lam[j + 1] (lam[NLW] = 0) of the rows rt, fp32: the weight of level j's run."""
    row = lam_ptr + (base + rt * H) * LS + j
    return tl.load(row, mask=mt, other=0.0) - tl.load(row + 1, mask=mt & (j + 1 < NLW), other=0.0)


@triton.jit
def _incoming_level(s0_ptr, lam_ptr, inc_ptr, i, bh, base, rt, mt, H, NLW, LS, K: tl.constexpr, V: tl.constexpr, rk,
                    rv, dtype: tl.constexpr):
    """(S_in,j [K, V] in ``dtype``, w_j of the chunk's rows fp32) of the i-th incoming level j = inc[i]: s0
    [B, H, NLW, K, V] fp32."""
    j = tl.load(inc_ptr + i)
    s = tl.load(s0_ptr + ((bh * NLW + j) * K + rk[:, None]) * V + rv[None, :],
                mask=(rk < K)[:, None] & (rv < V)[None, :], other=0.0).to(dtype)
    return s, _incoming_weight(lam_ptr, j, base, rt, mt, H, NLW, LS)


@triton.jit
def incoming_grad_kernel(qlast_ptr, do_ptr, lam_ptr, inc_ptr, out_ptr, NINC, NLW, LS, scale, T, H, ROWS,
                         K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    """Program (segment s of ROWS rows, batch x head): for each incoming level j = inc[i], the segment's share of
    dS_in,j = sum_t (scale w_j,t qlast_t)^T dO_t, fp32 [K, V] into out [S, B * H, NINC, K, V] (the caller sums the
    segments: no atomics, the same sum every run). The weight goes into dO's rows, rounded to qlast's dtype with
    them, as the product's operands."""
    seg = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = tl.arange(0, BV)
    mv = rv < V
    t1 = tl.minimum(seg * ROWS + ROWS, T)
    for i in range(0, NINC):
        j = tl.load(inc_ptr + i)
        acc = tl.zeros([BK, BV], dtype=tl.float32)
        for t0 in range(seg * ROWS, t1, C):
            rt = t0 + tl.arange(0, C)
            mt = rt < t1
            q = tl.load(qlast_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mt[:, None] & mk[None, :],
                        other=0.0)
            do = tl.load(do_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mt[:, None] & mv[None, :],
                         other=0.0).to(tl.float32)
            w = scale * _incoming_weight(lam_ptr, j, base, rt, mt, H, NLW, LS)
            acc += tl.dot(tl.trans(q), (do * w[:, None]).to(q.dtype)).to(tl.float32)
        tl.store(out_ptr + (((seg * tl.num_programs(1) + bh) * NINC + i) * K + rk[:, None]) * V + rv[None, :], acc,
                 mask=mk[:, None] & mv[None, :])


@flags_given(WRITE_O="o_ptr", STORE_Q="qcs_ptr", STORE_LAST="qlast_ptr", HAS_IN="s0_ptr")
@triton.jit
def tree_readout_fwd_kernel(qt_ptr, lam_ptr, nm_ptr, tot_ptr, ge_ptr, o_ptr, out_ptr, qcs_ptr, qlast_ptr, s0_ptr,
                            inc_ptr, NINC, NLW, LS, scale, B, T, TH, H, NL, P, NN, NPHI, K: tl.constexpr,
                            V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, WRITE_O: tl.constexpr,
                            STORE_Q: tl.constexpr, STORE_LAST: tl.constexpr, HAS_IN: tl.constexpr,
                            CARRY_ALL: tl.constexpr, HOIST: tl.constexpr):
    """Program (chunk n, batch x head): out[rows of n] = o + its buckets' readouts (rows of this program alone; o
    fp32, out in its own dtype, o itself for in place), and with qcs the query each bucket reads (in qcs's
    dtype). CARRY_ALL (a call with incoming states):
    the query is carried across every bucket, the last one too, down to the call's start, where it reads the
    incoming states (s0 of the levels inc[0..NINC-1]: o += scale w_j (q S_in,j)) and, with qlast, is stored
    (in qlast's dtype, q's) for the backward."""
    n, bh, b, h, base, rt, mt, rk, mk, rv, mv = _chunk_program(T, H, K, V, BK, BV, C)
    mtk = mt[:, None] & mk[None, :]
    q = tl.load(qt_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0).to(tl.float32)
    o = tl.zeros([C, BV], dtype=tl.float32)
    for m in range(0, NL):
        if ((n >> m) & 1) == 1:
            node = _node(n, m, P)
            carry = ((n >> (m + 1)) > 0) | CARRY_ALL   # a bucket above (or the incoming states) reads it carried
            tot = tl.load(tot_ptr + ((bh * NN + node) * K + rk[:, None]) * V + rv[None, :],
                          mask=mk[:, None] & mv[None, :], other=0.0)
            if HOIST:   # N's load issued with Tot's: one memory latency a bucket, not two
                nm = _map_tile(nm_ptr, bh, NPHI, node, K, rk, mk, carry)
            lam = scale * tl.load(lam_ptr + (base + rt * H) * LS + m, mask=mt, other=0.0)
            if STORE_Q:
                tl.store(qcs_ptr + _qcs_at(n, m, b, h, B, TH, H, K, rk, C), q.to(qcs_ptr.dtype.element_ty), mask=mtk)
            o += lam[:, None] * tl.dot(q.to(tot.dtype), tot).to(tl.float32)
            if carry:
                if not HOIST:
                    nm = _map_tile(nm_ptr, bh, NPHI, node, K, rk, mk, carry)
                q = tl.dot(-q.to(nm.dtype), nm, acc=tl.exp(tl.load(ge_ptr + bh * NPHI + node)) * q)
    if STORE_LAST:
        tl.store(qlast_ptr + (base + rt[:, None] * H) * K + rk[None, :], q.to(qlast_ptr.dtype.element_ty), mask=mtk)
    if HAS_IN:
        qb = q.to(tot_ptr.dtype.element_ty)   # (rounded once for every level; the fp32 q is not kept live)
        for i in range(0, NINC):
            s, w = _incoming_level(s0_ptr, lam_ptr, inc_ptr, i, bh, base, rt, mt, H, NLW, LS, K, V, rk, rv,
                                   tot_ptr.dtype.element_ty)
            o += (w * scale)[:, None] * tl.dot(qb, s).to(tl.float32)
    if WRITE_O:
        at = (base + rt[:, None] * H) * V + rv[None, :]
        mtv = mt[:, None] & mv[None, :]
        tl.store(out_ptr + at, (tl.load(o_ptr + at, mask=mtv, other=0.0) + o).to(out_ptr.dtype.element_ty), mask=mtv)


@flags_given(CARRY_ALL="s0_ptr")
@triton.jit
def tree_readout_bwd_kernel(qcs_ptr, lam_ptr, nm_ptr, tot_ptr, ge_ptr, do_ptr, qlast_ptr, s0_ptr, inc_ptr,
                            dlwin_ptr, NINC, NLW, LS, DLS, scale, dqt_ptr, dlam_ptr, dqcs_ptr, B, T, TH, H, NL, P, NN,
                            NPHI, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                            CARRY_ALL: tl.constexpr, HOIST: tl.constexpr):
    """Program (chunk n, batch x head): the readout's backward, buckets descending: dlam (the NL bucket levels of this
    chunk's rows, scale included: 0 where the bit is clear; row stride DLS), dqt (fp32), and dqcs (the gradient of
    the query leaving each bucket that a bucket above read, in dqcs's dtype) for ``tree_node_grad_kernel``. With s0
    (a call with incoming states) the walk starts from the gradient of the query that read them, sum_j scale w_j dO
    S_in,j^T, every bucket's leaving query has a gradient, and dlwin [B, T, H, NINC] gets their levels' weight
    gradients scale rowsum(qlast * dO S_in,j^T) (qlast: the forward's query at the call's start, in q's dtype)."""
    n, bh, b, h, base, rt, mt, rk, mk, rv, mv = _chunk_program(T, H, K, V, BK, BV, C)
    mtk = mt[:, None] & mk[None, :]
    do = tl.load(do_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
    dq = tl.zeros([C, BK], dtype=tl.float32)
    if CARRY_ALL:
        ql = tl.load(qlast_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0).to(tl.float32)
        for i in range(0, NINC):
            s, w = _incoming_level(s0_ptr, lam_ptr, inc_ptr, i, bh, base, rt, mt, H, NLW, LS, K, V, rk, rv,
                                   tot_ptr.dtype.element_ty)
            x = tl.dot(do.to(s.dtype), tl.trans(s)).to(tl.float32)
            dq += (w * scale)[:, None] * x
            tl.store(dlwin_ptr + (base + rt * H) * NINC + i, scale * tl.sum(ql * x, axis=1), mask=mt)
    for i in range(0, NL):
        m = NL - 1 - i
        part = tl.zeros([C], dtype=tl.float32)
        if ((n >> m) & 1) == 1:
            node = _node(n, m, P)
            carry = ((n >> (m + 1)) > 0) | CARRY_ALL
            tot = tl.load(tot_ptr + ((bh * NN + node) * K + rk[:, None]) * V + rv[None, :],
                          mask=mk[:, None] & mv[None, :], other=0.0)
            if HOIST:
                nm = _map_tile(nm_ptr, bh, NPHI, node, K, rk, mk, carry)
            lam = scale * tl.load(lam_ptr + (base + rt * H) * LS + m, mask=mt, other=0.0)
            at = _qcs_at(n, m, b, h, B, TH, H, K, rk, C)
            q = tl.load(qcs_ptr + at, mask=mtk, other=0.0)
            # dO Tot^T serves both: dlam = rowsum(q * dO Tot^T), dq += diag(lam) dO Tot^T (one product, not two)
            dx = tl.dot(do.to(tot.dtype), tl.trans(tot)).to(tl.float32)
            part = tl.sum(q.to(tl.float32) * dx, axis=1)
            if carry:
                tl.store(dqcs_ptr + at, dq.to(dqcs_ptr.dtype.element_ty), mask=mtk)
                if not HOIST:
                    nm = _map_tile(nm_ptr, bh, NPHI, node, K, rk, mk, carry)
                dq = tl.dot(-dq.to(nm.dtype), tl.trans(nm), acc=tl.exp(tl.load(ge_ptr + bh * NPHI + node)) * dq)
            dq += lam[:, None] * dx
        tl.store(dlam_ptr + (base + rt * H) * DLS + m, scale * part, mask=mt)
    tl.store(dqt_ptr + (base + rt[:, None] * H) * K + rk[None, :], dq, mask=mtk)


@triton.jit
def tree_node_grad_kernel(work_ptr, qcs_ptr, lam_ptr, do_ptr, dqcs_ptr, ge_ptr, dtot_ptr, dnm_ptr, dge_ptr, B, T, TH, H,
                          LS, scale, P, NN, NPHI, NT, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, C: tl.constexpr, CARRY_ALL: tl.constexpr):
    """Program (bucket node, batch x head, which): the node's gradients summed over the chunks that read it:
    which = 0: dTot = sum q^T diag(lam) dO (fp32 [K, V]); 1 (nodes a query is carried across): dN = -sum q^T dq'
    and dge = e sum <q, dq'> (dq': the gradient of the query leaving the bucket). Work items (m, j), longest
    first: node j of level m (j even: only those are buckets) serves chunks (j+1) 2^m .. (j+2) 2^m - 1."""
    item = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    which = tl.program_id(2)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    m = tl.load(work_ptr + 2 * item)
    j = tl.load(work_ptr + 2 * item + 1)
    node = _offset(P, m) + j
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = tl.arange(0, BV)
    mv = rv < V
    n0 = (j + 1) << m
    n1 = tl.minimum(n0 + (1 << m), NT)
    if which == 0:
        acc = tl.zeros([BK, BV], dtype=tl.float32)
        for n in range(n0, n1):
            rt = n * C + tl.arange(0, C)
            mt = rt < T
            q = tl.load(qcs_ptr + _qcs_at(n, m, b, h, B, TH, H, K, rk, C), mask=mt[:, None] & mk[None, :], other=0.0)
            lam = scale * tl.load(lam_ptr + (base + rt * H) * LS + m, mask=mt, other=0.0)
            do = tl.load(do_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mt[:, None] & mv[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.dot(tl.trans(q), (do * lam[:, None]).to(q.dtype)).to(tl.float32)
        tl.store(dtot_ptr + ((bh * NN + node) * K + rk[:, None]) * V + rv[None, :],
                 acc.to(dtot_ptr.dtype.element_ty), mask=mk[:, None] & mv[None, :])
    elif ((j > 0) | CARRY_ALL) & (node < NPHI):  # (j = 0: the first block, read by chunks with no bucket above,
        # unless the query goes on to the incoming states)
        acc = tl.zeros([BK, BK], dtype=tl.float32)
        tr = tl.zeros([BK], dtype=tl.float32)
        for n in range(n0, n1):
            rt = n * C + tl.arange(0, C)
            mtk = (rt < T)[:, None] & mk[None, :]
            at = _qcs_at(n, m, b, h, B, TH, H, K, rk, C)
            q = tl.load(qcs_ptr + at, mask=mtk, other=0.0)
            dq = tl.load(dqcs_ptr + at, mask=mtk, other=0.0)
            acc -= tl.dot(tl.trans(q), dq.to(q.dtype)).to(tl.float32)
            tr += tl.sum(q.to(tl.float32) * dq.to(tl.float32), axis=0)
        tl.store(dnm_ptr + ((bh * NPHI + node) * K + rk[:, None]) * K + rk[None, :],
                 acc.to(dnm_ptr.dtype.element_ty), mask=mk[:, None] & mk[None, :])
        tl.store(dge_ptr + bh * NPHI + node, tl.exp(tl.load(ge_ptr + bh * NPHI + node)) * tl.sum(tr, axis=0))


@triton.jit
def tree_level_bwd_kernel(nm_ptr, tot_ptr, ge_ptr, dnm_ptr, dtot_ptr, dge_ptr, flags_ptr, NN, NPHI, OFF, OFF1, M, TOP,
                          K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, WHICH: tl.constexpr):
    """Program (node i of level m + 1, batch x head): the gradients of node p = OFF1 + i passed to its halves
    a, b (added to what they hold: each node has one parent), one output per kernel variant (three launches a
    level) so that at most two [K, K] fp32 tiles are live. WHICH = 0: dTot_a += e_b dTot_p - N_b^T dTot_p,
    dTot_b += dTot_p; 1: dN_b += e_a dN_p - dTot_p Tot_a^T - dN_p N_a^T,
    dge_b += dge_p + e_b (<dTot_p, Tot_a> + <dN_p, N_a>); 2: dN_a += e_b dN_p - N_b^T dN_p,
    dge_a += dge_p + e_a <dN_p, N_b> (dN_p, dge_p: 0 where p has no N). Nodes a, b are of level M, p of M + 1.
    dN, dTot hold what the flags (``written_flags``: [NN] for dTot, then [NPHI] for dN) say was written before
    this pass, and what it wrote at the levels above (every node below TOP): the rest reads as 0, and a, b are
    written whole."""
    i = tl.program_id(0)
    _pass_down(nm_ptr, tot_ptr, ge_ptr, dnm_ptr, dtot_ptr, dge_ptr, flags_ptr, tl.program_id(1).to(tl.int64),
               OFF + 2 * i, OFF1 + i, NN, NPHI, M, TOP, K, V, BK, BV, WHICH)


@triton.jit
def _pass_down(nm_ptr, tot_ptr, ge_ptr, dnm_ptr, dtot_ptr, dge_ptr, flags_ptr, bh, a, p, NN, NPHI, M, TOP,
               K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, WHICH: tl.constexpr):
    """One variant (WHICH) of ``tree_level_bwd_kernel`` for the halves a, b = a + 1 (level M) of node p."""
    bn, rk, rv, mkv, mkk = _halves(a, K, V, BK, BV)
    has_np = p < NPHI
    a_tot = tl.load(flags_ptr + a) != 0
    a_n = tl.load(flags_ptr + NN + a) != 0
    b_tot = tl.load(flags_ptr + bn) != 0
    b_n = tl.load(flags_ptr + NN + bn) != 0
    p_tot = (M + 1 < TOP) | (tl.load(flags_ptr + p) != 0)
    p_n = (M + 1 < TOP) | (tl.load(flags_ptr + NN + p, mask=has_np, other=0) != 0)
    tv = ((bh * NN) * K + rk[:, None]) * V + rv[None, :]     # + node * K * V
    tk = ((bh * NPHI) * K + rk[:, None]) * K + rk[None, :]   # + node * K * K
    dge_p = tl.load(dge_ptr + bh * NPHI + p, mask=has_np, other=0.0)
    # fp32 gradients enter the axpy terms in fp32 and the products in q's dtype (loaded again, from L2), each
    # product accumulating into its output: at most one [K, K] fp32 tile live besides the output
    if WHICH == 0:
        nb = tl.load(nm_ptr + tk + bn * K * K, mask=mkk, other=0.0)
        e_b = tl.exp(tl.load(ge_ptr + bh * NPHI + bn))
        dtp = tl.load(dtot_ptr + tv + p * K * V, mask=mkv & p_tot, other=0.0).to(tl.float32)
        dtb = tl.load(dtot_ptr + tv + bn * K * V, mask=mkv & b_tot, other=0.0).to(tl.float32)
        tl.store(dtot_ptr + tv + bn * K * V, (dtb + dtp).to(dtot_ptr.dtype.element_ty), mask=mkv)
        dta = tl.load(dtot_ptr + tv + a * K * V, mask=mkv & a_tot, other=0.0).to(tl.float32) + e_b * dtp
        dtp_lo = tl.load(dtot_ptr + tv + p * K * V, mask=mkv & p_tot, other=0.0).to(nb.dtype)
        dta = tl.dot(tl.trans(-nb), dtp_lo, acc=dta)
        tl.store(dtot_ptr + tv + a * K * V, dta.to(dtot_ptr.dtype.element_ty), mask=mkv)
    elif WHICH == 1:
        ta = tl.load(tot_ptr + tv + a * K * V, mask=mkv, other=0.0)
        dtp = tl.load(dtot_ptr + tv + p * K * V, mask=mkv & p_tot, other=0.0).to(tl.float32)
        de_b = tl.sum(tl.sum(dtp * ta.to(tl.float32), axis=1), axis=0)
        dnb = tl.load(dnm_ptr + tk + bn * K * K, mask=mkk & b_n, other=0.0).to(tl.float32)
        if has_np:
            na = tl.load(nm_ptr + tk + a * K * K, mask=mkk, other=0.0)
            dnp = tl.load(dnm_ptr + tk + p * K * K, mask=mkk & p_n, other=0.0).to(tl.float32)
            dnb += tl.exp(tl.load(ge_ptr + bh * NPHI + a)) * dnp
            de_b += tl.sum(tl.sum(dnp * na.to(tl.float32), axis=1), axis=0)
            dnp_lo = tl.load(dnm_ptr + tk + p * K * K, mask=mkk & p_n, other=0.0).to(na.dtype)
            dnb = tl.dot(-dnp_lo, tl.trans(na), acc=dnb)
        dtp_lo = tl.load(dtot_ptr + tv + p * K * V, mask=mkv & p_tot, other=0.0).to(ta.dtype)
        dnb = tl.dot(-dtp_lo, tl.trans(ta), acc=dnb)
        tl.store(dnm_ptr + tk + bn * K * K, dnb.to(dnm_ptr.dtype.element_ty), mask=mkk)
        e_b = tl.exp(tl.load(ge_ptr + bh * NPHI + bn))
        tl.store(dge_ptr + bh * NPHI + bn, tl.load(dge_ptr + bh * NPHI + bn) + dge_p + e_b * de_b)
    else:  # WHICH == 2 (a is written even where p has no N: nothing else writes it)
        dna = tl.load(dnm_ptr + tk + a * K * K, mask=mkk & a_n, other=0.0).to(tl.float32)
        if has_np:
            nb = tl.load(nm_ptr + tk + bn * K * K, mask=mkk, other=0.0)
            dnp = tl.load(dnm_ptr + tk + p * K * K, mask=mkk & p_n, other=0.0).to(tl.float32)
            de_a = tl.sum(tl.sum(dnp * nb.to(tl.float32), axis=1), axis=0)
            dna += tl.exp(tl.load(ge_ptr + bh * NPHI + bn)) * dnp
            dnp_lo = tl.load(dnm_ptr + tk + p * K * K, mask=mkk & p_n, other=0.0).to(nb.dtype)
            dna = tl.dot(tl.trans(-nb), dnp_lo, acc=dna)
            e_a = tl.exp(tl.load(ge_ptr + bh * NPHI + a))
            tl.store(dge_ptr + bh * NPHI + a, tl.load(dge_ptr + bh * NPHI + a) + dge_p + e_a * de_a)
        tl.store(dnm_ptr + tk + a * K * K, dna.to(dnm_ptr.dtype.element_ty), mask=mkk)


@triton.jit
def _pulled_tot_grad(n, p, bh, nm_ptr, ge_ptr, dtot_ptr, NN, NPHI, K: tl.constexpr, V: tl.constexpr, rk, rv, mkk, mkv,
                     n_tot, p_tot):
    """(dTot of level-0 node n with its parent p's share, fp32; dTot_p in the tree's dtype): a = n even takes
    e_b dTot_p - N_b^T dTot_p, b = n odd dTot_p (what ``tree_level_bwd_kernel`` WHICH=0 adds). n_tot, p_tot:
    whether n's, p's dTot hold anything (else 0)."""
    tv = ((bh * NN) * K + rk[:, None]) * V + rv[None, :]
    dtp = tl.load(dtot_ptr + tv + p * K * V, mask=mkv & p_tot, other=0.0)
    own = tl.load(dtot_ptr + tv + n * K * V, mask=mkv & n_tot, other=0.0).to(tl.float32)
    if n % 2 == 1:
        return own + dtp.to(tl.float32), dtp
    nb = tl.load(nm_ptr + ((bh * NPHI + n + 1) * K + rk[:, None]) * K + rk[None, :], mask=mkk, other=0.0)
    own += tl.exp(tl.load(ge_ptr + bh * NPHI + n + 1)) * dtp.to(tl.float32)
    return tl.dot(tl.trans(-nb), dtp.to(nb.dtype), acc=own), dtp


@triton.jit
def _pulled_map_grad(n, p, bh, nm_ptr, tot_ptr, ge_ptr, dnm_ptr, dge_ptr, dtp, NN, NPHI, K: tl.constexpr,
                     V: tl.constexpr, rk, rv, mkk, mkv, n_n, p_n):
    """(dN fp32, dge) of level-0 node n with its parent p's share (what ``tree_level_bwd_kernel`` WHICH=1 adds to
    b = n odd, WHICH=2 to a = n even; dN_p, dge_p: 0 where p has no N). n_n, p_n: whether n's, p's dN hold
    anything (else 0)."""
    tk = ((bh * NPHI) * K + rk[:, None]) * K + rk[None, :]
    has_np = p < NPHI
    dnp = tl.load(dnm_ptr + tk + p * K * K, mask=mkk & has_np & p_n, other=0.0)
    dge = tl.load(dge_ptr + bh * NPHI + n) + tl.load(dge_ptr + bh * NPHI + p, mask=has_np, other=0.0)
    e_n = tl.exp(tl.load(ge_ptr + bh * NPHI + n))
    dn = tl.load(dnm_ptr + tk + n * K * K, mask=mkk & n_n, other=0.0).to(tl.float32)
    # the decay gradients <dTot_p, Tot_a> + <dN_p, N_a> (b) and <dN_p, N_b> (a) are the traces of the products
    # dN needs anyway (no [K, K] fp32 elementwise temporaries)
    diag = rk[:, None] == rk[None, :]
    if n % 2 == 1:   # b: sibling a = n - 1
        a = n - 1
        ta = tl.load(tot_ptr + ((bh * NN + a) * K + rk[:, None]) * V + rv[None, :], mask=mkv, other=0.0)
        na = tl.load(nm_ptr + tk + a * K * K, mask=mkk, other=0.0)
        x = tl.dot(dtp.to(ta.dtype), tl.trans(ta))
        x = tl.dot(dnp.to(na.dtype), tl.trans(na), acc=x)
        dge += e_n * tl.sum(tl.sum(tl.where(diag, x, 0.0), axis=1), axis=0)
        dn += tl.exp(tl.load(ge_ptr + bh * NPHI + a)) * dnp.to(tl.float32) - x
    else:            # a: sibling b = n + 1
        nb = tl.load(nm_ptr + tk + (n + 1) * K * K, mask=mkk, other=0.0)
        y = tl.dot(tl.trans(nb), dnp.to(nb.dtype))
        dge += e_n * tl.sum(tl.sum(tl.where(diag, y, 0.0), axis=1), axis=0)
        dn += tl.exp(tl.load(ge_ptr + bh * NPHI + n + 1)) * dnp.to(tl.float32) - y
    return dn, dge


@triton.jit
def tree_subtree_bwd_kernel(nm_ptr, tot_ptr, ge_ptr, dnm_ptr, dtot_ptr, dge_ptr, flags_ptr, NN, NPHI, P, TOP,
                            K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, J: tl.constexpr):
    """Program (node s of level J, batch x head): the pass down the tree inside its subtree, levels J - 1 to 1 as
    ``tree_level_bwd_kernel`` (all three variants a node) in one launch; each level's gradients are stored before
    the level below reads them, behind a barrier (the program's own recent stores: mostly L2 hits, where a launch
    a level reads them from DRAM). (The chunks' part stays a launch of its own: with these levels in it, it
    spilled 536 bytes for sm_90 at J = 2.)"""
    s = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    for mm in range(0, J - 1):   # (a loop, not unrolled: unrolled over 2 levels it spilled 608 bytes)
        m = J - 1 - mm       # parents of level m + 1, halves of level m
        for i in range(0, 1 << (J - m - 1)):
            idx = (s << (J - m - 1)) + i
            for which in tl.static_range(3):
                _pass_down(nm_ptr, tot_ptr, ge_ptr, dnm_ptr, dtot_ptr, dge_ptr, flags_ptr, bh, _offset(P, m) + 2 * idx,
                           _offset(P, m + 1) + idx, NN, NPHI, m, TOP, K, V, BK, BV, which)
        tl.debug_barrier()


@flags_given(HAS_W="w_ptr")
@triton.jit
def tree_maps_bwd_kernel(k_ptr, w_ptr, u_ptr, gam_ptr, nm_ptr, tot_ptr, ge_ptr, dnm_ptr, dtot_ptr, dge_ptr, dk_ptr,
                         dw_ptr, du_ptr, dgam_ptr, flags_ptr, T, H, NN, NPHI, OFF1, TOP, K: tl.constexpr,
                         V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, HAS_W: tl.constexpr,
                         PULL: tl.constexpr):
    """Program (chunk n, batch x head): the gradients of level 0 (dN, dTot, dge of node n) into the chunk's
    k, W, Ut and gam rows (fp32 stores: the rows are this program's): N = kd^T W, Tot = kd^T Ut, ge = gl,
    kd = diag(d) K with d = exp(gl - gam). With PULL the node's gradients are completed here with its parent's
    share (parent OFF1 + n // 2, whose gradients are final): the last level of the pass down the tree, without
    storing the level-0 gradients and loading them again. Flags as in ``tree_level_bwd_kernel``."""
    n, bh, b, h, base, rt, mt, rk, mk, rv, mv = _chunk_program(T, H, K, V, BK, BV, C)
    n_tot = tl.load(flags_ptr + n) != 0
    n_n = tl.load(flags_ptr + NN + n) != 0
    mtk = mt[:, None] & mk[None, :]
    mtv = mt[:, None] & mv[None, :]
    mkk = mk[:, None] & mk[None, :]
    mkv = mk[:, None] & mv[None, :]
    # the node's gradients first, rounded to the tree's dtype as the pass down the tree stores them: only those
    # two tiles stay live into the chunk's part
    lo = tot_ptr.dtype.element_ty
    if PULL:
        p = OFF1 + n // 2
        p_tot = (1 < TOP) | (tl.load(flags_ptr + p) != 0)
        p_n = (1 < TOP) | (tl.load(flags_ptr + NN + p, mask=p < NPHI, other=0) != 0)
        dtot, dtp = _pulled_tot_grad(n, p, bh, nm_ptr, ge_ptr, dtot_ptr, NN, NPHI, K, V, rk, rv, mkk, mkv, n_tot,
                                     p_tot)
        dtot = dtot.to(lo)
        dnm, dge_n = _pulled_map_grad(n, p, bh, nm_ptr, tot_ptr, ge_ptr, dnm_ptr, dge_ptr, dtp, NN, NPHI, K, V, rk,
                                      rv, mkk, mkv, n_n, p_n)
        dnm = dnm.to(lo)
    else:
        dtot = tl.load(dtot_ptr + ((bh * NN + n) * K + rk[:, None]) * V + rv[None, :], mask=mkv & n_tot, other=0.0)
        dnm = tl.load(dnm_ptr + ((bh * NPHI + n) * K + rk[:, None]) * K + rk[None, :], mask=mkk & n_n, other=0.0)
        dge_n = tl.load(dge_ptr + bh * NPHI + n)
    last = tl.minimum(n * C + C - 1, T - 1)
    gam = tl.load(gam_ptr + base + rt * H, mask=mt, other=0.0)
    gl = tl.load(gam_ptr + base + last * H)
    d = tl.where(mt, tl.exp(gl - gam), 0.0)
    kc = tl.load(k_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
    kd = (kc.to(tl.float32) * d[:, None]).to(kc.dtype)
    uc = tl.load(u_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mtv, other=0.0).to(kc.dtype)
    dtot = dtot.to(kc.dtype)
    dkd = tl.dot(uc, tl.trans(dtot)).to(tl.float32)
    tl.store(du_ptr + (base + rt[:, None] * H) * V + rv[None, :], tl.dot(kd, dtot).to(tl.float32), mask=mtv)
    if HAS_W:
        dnm = dnm.to(kc.dtype)
        wc = tl.load(w_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0).to(kc.dtype)
        dkd += tl.dot(wc, tl.trans(dnm)).to(tl.float32)
        tl.store(dw_ptr + (base + rt[:, None] * H) * K + rk[None, :], tl.dot(kd, dnm).to(tl.float32), mask=mtk)
    tl.store(dk_ptr + (base + rt[:, None] * H) * K + rk[None, :], dkd * d[:, None], mask=mtk)
    dd = tl.sum(dkd * kc.to(tl.float32), axis=1) * d     # the gradient of (gl - gam) per row
    dgl = tl.sum(dd, axis=0) + dge_n
    tl.store(dgam_ptr + base + rt * H, tl.where(rt == last, dgl, 0.0) - dd, mask=mt)


def qcs_rows(T: int) -> int:
    """TH: the rows a level of qcs holds, ceil(NT / 2) chunks (``_qcs_at``)."""
    return -(-triton.cdiv(T, CHUNK) // 2) * CHUNK


def _launch(K: int, V: int, warps: int = WARPS) -> dict:
    return dict(K=K, V=V, BK=pow2(K), BV=pow2(V), num_warps=warps)


def build_tree(k, w, u, gam, NL: int, top: int, dtype):
    """(nm [B, H, NPHI, K, K], tots [B, H, NN, K, V] in ``dtype``, ge [B, H, NPHI] fp32): Tot of levels
    0 .. top, N and ge of levels 0 .. top - 1 (at least level 0)."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    P = 1 << NL
    NN, NPHI = level_offset(P, top + 1), max(level_offset(P, top), P)
    dev = k.device
    nm = torch.empty(B, H, NPHI, K, K, device=dev, dtype=dtype)
    tots = torch.empty(B, H, NN, K, V, device=dev, dtype=dtype)
    ge = torch.empty(B, H, NPHI, device=dev, dtype=torch.float32)
    launch = _launch(K, V)
    J = min(int(triton_levels.CONFIG["SUBTREE"]), top)   # levels 1..J in the launch of level 0
    tree_subtree_fwd_kernel[(P >> J, B * H)](k, w, u, gam, nm, tots, ge, T, H, NN, NPHI, P, 0, C=CHUNK, J=J,
                                             MAPS=True, **launch)
    m, up = J, int(triton_levels.CONFIG["SUBTREE_UP"])   # the levels above: UP a launch (1: one a level)
    while m < top:
        j = min(up, top - m)
        if j == 1:
            tree_level_fwd_kernel[(P >> (m + 1), B * H)](nm, tots, ge, NN, NPHI, level_offset(P, m),
                                                         level_offset(P, m + 1), **launch)
        else:
            tree_subtree_fwd_kernel[(P >> (m + j), B * H)](k, w, u, gam, nm, tots, ge, T, H, NN, NPHI, P, m, C=CHUNK,
                                                           J=j, MAPS=False, **launch)
        m += j
    return nm, tots, ge


def row_stride(lam) -> int:
    """LS: the row stride of the level weights ``lam`` [B, T, H, NLW] fp32, a view of the levels above the chunk
    into the op's [B, T, H, L] (contiguous) weights, as the kernels index it: (row b, t, h) at ((b T + t) H + h) LS."""
    B, T, H, _ = lam.shape
    LS = lam.stride(2)
    assert lam.dtype == torch.float32 and lam.stride(3) == 1 and lam.stride(1) == H * LS and (
        B == 1 or lam.stride(0) == T * H * LS), "level weights: a last-axis slice of a contiguous fp32 [B, T, H, L]"
    return LS


def readout_forward(o, qt, lam, nm, tots, ge, P: int, scale: float, store_q: bool, incoming=None,
                    store_last: bool = False, out=None):
    """out [B, T, H, V] = o (fp32) + the buckets' readouts (out None: o in place; o None: nothing written; a
    separate out in q's dtype spares the caller a cast of the fp32 o); lam: the weights of the levels above the
    chunk (``row_stride``). Returns (qcs or None: the query each bucket read; with ``store_last`` qlast
    [B, T, H, K] in q's dtype, else None). ``incoming`` (a call with incoming states: ``incoming_args``) carries
    the query across every bucket down to the call's start (the tree then needs N of every level it reads), where
    it reads them into o; qlast is that query."""
    B, T, H, K = qt.shape
    NL = P.bit_length() - 1
    qcs = torch.empty(NL, B, qcs_rows(T), H, K, device=qt.device, dtype=tots.dtype) if store_q else None
    # (qlast in q's dtype: what the incoming states' gradients multiply in, and half the bytes of an fp32 one)
    qlast = torch.empty(B, T, H, K, device=qt.device, dtype=qt.dtype) if store_last else None
    s0, inc, ninc = incoming or (None, None, 0)
    has_in = incoming is not None and o is not None   # (the readout of the incoming states: HAS_IN)
    tree_readout_fwd_kernel[(triton.cdiv(T, CHUNK), B * H)](
        qt, lam, nm, tots, ge, o, o if out is None else out, qcs, qlast, s0 if has_in else None, inc,
        ninc, lam.shape[-1], row_stride(lam), float(scale), B, T, qcs_rows(T), H, NL, P, tots.shape[2], nm.shape[2],
        C=CHUNK, CARRY_ALL=incoming is not None, HOIST=bool(triton_levels.CONFIG["HOIST"]),
        **_launch(K, tots.shape[-1], triton_levels.CONFIG["warps_readout_in" if has_in else "warps_readout_fwd"]))
    return qcs, qlast


def incoming_state_grads(qlast, lam, levels: list[int], scale: float, do, rows: int | None = None) -> dict:
    """{j: dS_in,j [B, H, K, V] fp32} = sum_t (scale w_j,t qlast_t)^T dO_t for the incoming levels j (``levels``) of a
    call with incoming states: qlast [B, T, H, K] (``readout_forward``'s, in q's dtype), do [B, T, H, V] contiguous,
    lam the level weights (``row_stride``). One pass over qlast and dO a level, the rows split into segments of
    ``rows`` (a multiple of the chunk; default: at most 32 segments a batch x head, at least 2,048 rows each) whose
    sums are added here."""
    B, T, H, K = qlast.shape
    V = do.shape[-1]
    assert qlast.is_contiguous() and do.is_contiguous() and do.shape[:3] == (B, T, H)
    rows = rows or max(2048, triton.cdiv(triton.cdiv(T, 32), CHUNK) * CHUNK)
    assert rows % CHUNK == 0
    segs = triton.cdiv(T, rows)
    inc = cached_work(("incoming levels", tuple(levels)), lambda: list(levels), qlast.device)
    out = torch.empty(segs, B * H, len(levels), K, V, device=qlast.device, dtype=torch.float32)
    incoming_grad_kernel[(segs, B * H)](qlast, do, lam, inc, out, len(levels), lam.shape[-1], row_stride(lam),
                                        float(scale), T, H, rows, K=K, V=V, BK=pow2(K), BV=pow2(V), C=CHUNK,
                                        num_warps=4)
    total = out.sum(0).view(B, H, len(levels), K, V)
    return {j: total[:, :, i] for i, j in enumerate(levels)}


def incoming_args(s0, levels: list[int]):
    """What the readout kernels take of a call's incoming states: (s0 [B, H, NLW, K, V] fp32, the levels that read
    them (int32, on the device, cached), their count)."""
    inc = cached_work(("incoming levels", tuple(levels)), lambda: list(levels), s0.device)
    return s0.float().contiguous(), inc, len(levels)


def written_flags(P: int, top: int, NT: int, nphi: int, carry_all: bool, final: tuple, device):
    """(flags, zt, zn) for the tree's gradient buffers before the pass down the tree, cached per shape on the device
    as int32: flags [NN + NPHI], 1 where dTot (first NN) / dN (then NPHI) of a node holds a value: the buckets that
    ``tree_node_grad_kernel`` writes (j even, bucket levels only, read by real chunks; dN where also j > 0 or
    ``carry_all``, and the node has an N), and the final states' nodes ``final`` (dN: their N slots); zt, zn: the
    final states' nodes (dTot) and N slots (dN) that the sums do not write, to be zeroed before their share is
    added (int64 index tensors, or None)."""
    NLB, NN = P.bit_length() - 1, level_offset(P, top + 1)

    def build():
        wt, wn = [0] * NN, [0] * nphi
        for m in range(top + 1):
            for j in range(0, P >> m, 2):
                node = level_offset(P, m) + j
                if m < NLB and ((j + 1) << m) < NT:
                    wt[node] = 1
                    if (j > 0 or carry_all) and node < nphi:
                        wn[node] = 1
        zt = sorted({i for i in final if not wt[i]})
        zn = sorted({min(i, nphi - 1) for i in final if not wn[min(i, nphi - 1)]})
        for i in final:
            wt[i] = wn[min(i, nphi - 1)] = 1
        return wt + wn, zt, zn

    built = []   # (build once, though three cached tensors come from it)

    def part(which: int) -> list:
        if not built:
            built.append(build())
        return built[0][which]

    key = ("tree written", P, top, NT, nphi, bool(carry_all), tuple(final))
    flags = cached_work(key, lambda: part(0), device)
    zt, zn = (cached_work((*key, which), lambda which=which: part(which), device).long() if final else None
              for which in (1, 2))
    return flags, (zt if zt is not None and zt.numel() else None), (zn if zn is not None and zn.numel() else None)


def tree_gradients(qcs, lam, nm, tots, ge, do, P: int, scale: float, dlam, top: int, dfinal=None, incoming=None,
                   qlast=None):
    """The readout's backward and the per-node sums: (dqt [B, T, H, K] fp32, the tree's gradients dnm, dtots in the
    tree's dtype, dge fp32, before they go down the tree, dlwin or None, and ``written_flags``' flags for the pass
    down the tree); writes the bucket levels' columns of dlam (lam's layout, ``row_stride``). ``dfinal``: the final
    states' share on the nodes they read (``transition_tree._final_runs_grad``: device indices, gradients and the
    nodes as a host list), added. ``incoming`` (``incoming_args``) and qlast
    (``readout_forward``'s): a call with incoming states; then dlwin [B, T, H, len(levels)] fp32 are the gradients
    of those levels' weights w_j = lam[j] - lam[j + 1] from the incoming readout."""
    NL, B, TH, H, K = qcs.shape
    T = lam.shape[1]
    V, NN, NPHI = tots.shape[-1], tots.shape[2], nm.shape[2]
    NT = triton.cdiv(T, CHUNK)
    dev = qcs.device
    LS = row_stride(lam)
    assert dlam.shape == lam.shape
    dqt = torch.empty(B, T, H, K, device=dev, dtype=torch.float32)
    dqcs = torch.empty_like(qcs)
    s0, inc, ninc = incoming or (None, None, 0)
    scale = float(scale)
    dlwin = torch.empty(B, T, H, ninc, device=dev, dtype=torch.float32) if incoming else None
    cfg = triton_levels.CONFIG
    tree_readout_bwd_kernel[(NT, B * H)](qcs, lam, nm, tots, ge, do, qlast, s0, inc, dlwin, ninc, lam.shape[-1], LS,
                                         row_stride(dlam), scale, dqt, dlam, dqcs, B, T, TH, H, NL, P, NN, NPHI,
                                         HOIST=bool(cfg["HOIST"]), C=CHUNK, **_launch(K, V, cfg["warps_readout_bwd"]))
    # the tree's gradients in its own dtype (q's): sums formed in fp32 in registers, stored rounded once a level;
    # not zero-filled (module docstring): the flags say which nodes hold a value
    dnm, dtots = _unseeded(nm), _unseeded(tots)
    dge = torch.zeros(ge.shape, device=dev, dtype=torch.float32)
    flags, zt, zn = written_flags(P, top, NT, NPHI, incoming is not None, tuple(dfinal[3]) if dfinal else (), dev)
    # the buckets that real chunks read, the longest sums first
    work = cached_work(("tree buckets", NL, NT), lambda: [(m, j) for m in range(NL - 1, -1, -1)
                                                          for j in range(0, P >> m, 2) if ((j + 1) << m) < NT], dev)
    if work.numel():
        tree_node_grad_kernel[(work.shape[0], B * H, 2)](work, qcs, lam, do, dqcs, ge, dtots, dnm, dge, B, T, TH, H, LS,
                                                         scale, P, NN, NPHI, NT, CARRY_ALL=incoming is not None,
                                                         C=CHUNK, **_launch(K, V, cfg["warps_node"]),
                                                         num_stages=cfg["stages_node"])
    if dfinal is not None:   # (nodes, their N / ge slots, gradients of those nodes' N, Tot, ge, the nodes' list)
        idx, phi_idx, (g_nm, g_tot, g_ge), _ = dfinal
        if zt is not None:   # nodes the sums did not write: 0 before the share is added
            dtots.index_fill_(2, zt, 0.0)
        if zn is not None:
            dnm.index_fill_(2, zn, 0.0)
        dtots.index_add_(2, idx, g_tot.to(dtots.dtype))
        # a node without N (the top one) reads a stand-in slot whose N it never uses: its gradients there are
        # 0, so they add nothing (no mask: selecting by one would wait for the GPU)
        dnm.index_add_(2, phi_idx, g_nm.to(dnm.dtype))
        dge.index_add_(2, phi_idx, g_ge)
    return dqt, dnm, dtots, dge, dlwin, flags


def _unseeded(x):
    """An uninitialised buffer like x for the tree's gradients (the kernels write every node before they read it,
    or read it as 0: ``written_flags``). On the CPU (tests, the Triton interpreter) it is filled with NaN, so that a
    read of a node nothing wrote shows in every result instead of passing on memory that happens to be zero."""
    out = torch.empty_like(x)
    return out.fill_(float("nan")) if out.device.type == "cpu" else out


def tree_backward_pass(k, w, u, gam, nm, tots, ge, dnm, dtots, dge, P: int, top: int, flags):
    """Down the tree (level top - 1 to 1) and into the chunks, which take their level-0 node's share of its parent
    themselves: (dk, dw or None, du, dgam) fp32. ``flags``: which nodes of dnm, dtots hold a value
    (``tree_gradients``)."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    NN, NPHI = tots.shape[2], nm.shape[2]
    launch = _launch(K, V)
    J = min(int(triton_levels.CONFIG["SUBTREE_BWD"]), top)   # levels J - 1 .. 1 in one launch
    for m in range(top - 1, max(J, 1) - 1, -1):
        for which in range(3):
            tree_level_bwd_kernel[(P >> (m + 1), B * H)](nm, tots, ge, dnm, dtots, dge, flags, NN, NPHI,
                                                         level_offset(P, m), level_offset(P, m + 1), m, top,
                                                         WHICH=which, **launch)
    if J >= 2:
        tree_subtree_bwd_kernel[(P >> J, B * H)](nm, tots, ge, dnm, dtots, dge, flags, NN, NPHI, P, top, J=J,
                                                 **launch, num_stages=1)
    dev = k.device
    dk = torch.empty(B, T, H, K, device=dev, dtype=torch.float32)
    dw = None if w is None else torch.empty(B, T, H, K, device=dev, dtype=torch.float32)
    du = torch.empty(B, T, H, V, device=dev, dtype=torch.float32)
    dgam = torch.empty(B, T, H, device=dev, dtype=torch.float32)
    tree_maps_bwd_kernel[(triton.cdiv(T, CHUNK), B * H)](k, w, u, gam, nm, tots, ge, dnm, dtots, dge, dk, dw, du, dgam,
                                                         flags, T, H, NN, NPHI, level_offset(P, 1), top, C=CHUNK,
                                                         PULL=top >= 1,
                                                         **_launch(K, V, triton_levels.CONFIG["warps_maps_bwd"]))
    return dk, dw, du, dgam

