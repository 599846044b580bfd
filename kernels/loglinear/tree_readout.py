"""Triton kernels of the transition tree's readout (``transition_tree``): the part that touches every token.

Chunk n reads its levels above the chunk from the buckets of its index: for every bit m of n that is set,
ascending, with the tree's node i = off_m + (n >> m) - 1 (the block of 2^m chunks before n's half-block;
off_m = 2P - 2(P >> m) numbers the nodes of level m after those of the levels below),

    o_n += diag(lam_m) (q Tot_i),     q <- q Phi_i      (q starts as qt_n, the query carried to the chunk start)

``tree_readout_fwd_kernel`` runs it per chunk (program (chunk, batch x head); the whole V in one program, so
the carried query is formed once), optionally storing the query each bucket sees (qcs). The backward per
chunk, buckets descending (``tree_readout_bwd_kernel``):

    dlam_m = rowsum(dO * (q_m Tot_i)),  dq_m = diag(lam_m) dO Tot_i^T + dq_next Phi_i^T   (dqt = dq of the lowest)

storing dq_next (the gradient of the query leaving bucket m); then per bucket node, summed over the chunks
that read it (``tree_node_grad_kernel``: the 2^m chunks of the half-block after it),

    dTot_i = sum q_m^T diag(lam_m) dO,   dPhi_i = sum q_m^T dq_next.

Layouts: tokens [B, T, H, D]; lam, dlam [B, T, H, NL] fp32 (the bucket weights, scale included); the tree
[B, H, nodes, K, K|V]; qcs / dqcs [NL, B, T, H, K] (row block of chunk n at level m written only where bit m
of n is set).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton.common import CHUNK, flags_given, pow2


@triton.jit
def _node(n, m, P):
    """The tree node of chunk n's bucket at level m (bit m of n set)."""
    return 2 * P - 2 * (P >> m) + (n >> m) - 1


@flags_given(WRITE_O="o_ptr", STORE_Q="qcs_ptr")
@triton.jit
def tree_readout_fwd_kernel(qt_ptr, lam_ptr, phi_ptr, tot_ptr, o_ptr, qcs_ptr, B, T, H, NL, P, NN, NPHI,
                            K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            C: tl.constexpr, WRITE_O: tl.constexpr, STORE_Q: tl.constexpr):
    """Program (chunk n, batch x head): o[rows of n] += its buckets' readouts (fp32, rows of this program
    alone), and with qcs the query each bucket reads (in qcs's dtype)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    rt = n * C + tl.arange(0, C)
    mt = rt < T
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = tl.arange(0, BV)
    mv = rv < V
    mtk = mt[:, None] & mk[None, :]
    q = tl.load(qt_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0).to(tl.float32)
    o = tl.zeros([C, BV], dtype=tl.float32)
    for m in range(0, NL):
        if ((n >> m) & 1) == 1:
            node = _node(n, m, P)
            tot = tl.load(tot_ptr + ((bh * NN + node) * K + rk[:, None]) * V + rv[None, :],
                          mask=mk[:, None] & mv[None, :], other=0.0)
            lam = tl.load(lam_ptr + (base + rt * H) * NL + m, mask=mt, other=0.0)
            if STORE_Q:
                tl.store(qcs_ptr + ((m * B * T + b * T + rt[:, None]) * H + h) * K + rk[None, :],
                         q.to(qcs_ptr.dtype.element_ty), mask=mtk)
            o += lam[:, None] * tl.dot(q.to(tot.dtype), tot).to(tl.float32)
            if (n >> (m + 1)) > 0:  # a bucket above reads the query carried across this one
                phi = tl.load(phi_ptr + ((bh * NPHI + node) * K + rk[:, None]) * K + rk[None, :],
                              mask=mk[:, None] & mk[None, :], other=0.0)
                q = tl.dot(q.to(phi.dtype), phi).to(tl.float32)
    if WRITE_O:
        optr = o_ptr + (base + rt[:, None] * H) * V + rv[None, :]
        mtv = mt[:, None] & mv[None, :]
        tl.store(optr, tl.load(optr, mask=mtv, other=0.0) + o, mask=mtv)


@triton.jit
def tree_readout_bwd_kernel(qcs_ptr, lam_ptr, phi_ptr, tot_ptr, do_ptr, dqt_ptr, dlam_ptr, dqcs_ptr, B, T, H, NL,
                            P, NN, NPHI, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            C: tl.constexpr):
    """Program (chunk n, batch x head): the readout's backward, buckets descending: dlam (every level of
    this chunk's rows: 0 where the bit is clear), dqt (fp32), and dqcs (the gradient of the query leaving
    each bucket that a bucket above read, in dqcs's dtype) for ``tree_node_grad_kernel``."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    rt = n * C + tl.arange(0, C)
    mt = rt < T
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = tl.arange(0, BV)
    mv = rv < V
    mtk = mt[:, None] & mk[None, :]
    do = tl.load(do_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mt[:, None] & mv[None, :],
                 other=0.0).to(tl.float32)
    dq = tl.zeros([C, BK], dtype=tl.float32)
    for i in range(0, NL):
        m = NL - 1 - i
        part = tl.zeros([C], dtype=tl.float32)
        if ((n >> m) & 1) == 1:
            node = _node(n, m, P)
            tot = tl.load(tot_ptr + ((bh * NN + node) * K + rk[:, None]) * V + rv[None, :],
                          mask=mk[:, None] & mv[None, :], other=0.0)
            lam = tl.load(lam_ptr + (base + rt * H) * NL + m, mask=mt, other=0.0)
            q = tl.load(qcs_ptr + ((m * B * T + b * T + rt[:, None]) * H + h) * K + rk[None, :], mask=mtk,
                        other=0.0)
            part = tl.sum(do * tl.dot(q.to(tot.dtype), tot).to(tl.float32), axis=1)
            if (n >> (m + 1)) > 0:
                tl.store(dqcs_ptr + ((m * B * T + b * T + rt[:, None]) * H + h) * K + rk[None, :],
                         dq.to(dqcs_ptr.dtype.element_ty), mask=mtk)
                phi = tl.load(phi_ptr + ((bh * NPHI + node) * K + rk[:, None]) * K + rk[None, :],
                              mask=mk[:, None] & mk[None, :], other=0.0)
                dq = tl.dot(dq.to(phi.dtype), tl.trans(phi)).to(tl.float32)
            dq += tl.dot((do * lam[:, None]).to(tot.dtype), tl.trans(tot)).to(tl.float32)
        tl.store(dlam_ptr + (base + rt * H) * NL + m, part, mask=mt)
    tl.store(dqt_ptr + (base + rt[:, None] * H) * K + rk[None, :], dq, mask=mtk)


@triton.jit
def tree_node_grad_kernel(work_ptr, qcs_ptr, lam_ptr, do_ptr, dqcs_ptr, dtot_ptr, dphi_ptr, B, T, H, NL, P, NN,
                          NPHI, NT, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          C: tl.constexpr):
    """Program (bucket node, batch x head, which): the node's gradients summed over the chunks that read it,
    which = 0: dTot (fp32 [K, V]), 1: dPhi (fp32 [K, K], for nodes carried across). Work items (m, j) sorted
    longest first: node j at level m (j even: only those are buckets) serves chunks (j+1) 2^m .. (j+2) 2^m - 1."""
    item = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    which = tl.program_id(2)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    m = tl.load(work_ptr + 2 * item)
    j = tl.load(work_ptr + 2 * item + 1)
    node = 2 * P - 2 * (P >> m) + j
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
            q = tl.load(qcs_ptr + ((m * B * T + b * T + rt[:, None]) * H + h) * K + rk[None, :],
                        mask=mt[:, None] & mk[None, :], other=0.0)
            lam = tl.load(lam_ptr + (base + rt * H) * NL + m, mask=mt, other=0.0)
            do = tl.load(do_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mt[:, None] & mv[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.dot(tl.trans(q), (do * lam[:, None]).to(q.dtype)).to(tl.float32)
        tl.store(dtot_ptr + ((bh * NN + node) * K + rk[:, None]) * V + rv[None, :], acc,
                 mask=mk[:, None] & mv[None, :])
    elif node < NPHI:
        acc = tl.zeros([BK, BK], dtype=tl.float32)
        for n in range(n0, n1):
            rt = n * C + tl.arange(0, C)
            mtk = (rt < T)[:, None] & mk[None, :]
            if (n >> (m + 1)) > 0:
                q = tl.load(qcs_ptr + ((m * B * T + b * T + rt[:, None]) * H + h) * K + rk[None, :], mask=mtk,
                            other=0.0)
                dq = tl.load(dqcs_ptr + ((m * B * T + b * T + rt[:, None]) * H + h) * K + rk[None, :], mask=mtk,
                             other=0.0)
                acc += tl.dot(tl.trans(q), dq.to(q.dtype)).to(tl.float32)
        tl.store(dphi_ptr + ((bh * NPHI + node) * K + rk[:, None]) * K + rk[None, :], acc,
                 mask=mk[:, None] & mk[None, :])


def _dims(qt, tots, phis):
    B, T, H, K = qt.shape
    return B, T, H, K, tots.shape[-1], tots.shape[2], phis.shape[2]


def readout_forward(o, qt, lam, phis, tots, P: int, store_q: bool):
    """o [B, T, H, V] fp32 += the buckets' readouts; returns qcs (or None): the query each bucket read."""
    B, T, H, K, V, NN, NPHI = _dims(qt, tots, phis)
    NL = lam.shape[-1]
    qcs = torch.empty(NL, B, T, H, K, device=qt.device, dtype=tots.dtype) if store_q else None
    tree_readout_fwd_kernel[(triton.cdiv(T, CHUNK), B * H)](
        qt, lam, phis, tots, o, qcs, B, T, H, NL, P, NN, NPHI, K=K, V=V, BK=pow2(K), BV=pow2(V), C=CHUNK,
        num_warps=8)
    return qcs


def readout_backward(qcs, lam, phis, tots, do, P: int):
    """(dqt [B, T, H, K] fp32, dlam [B, T, H, NL] fp32, dtots, dphis fp32 shaped like tots, phis)."""
    NL, B, T, H, K = qcs.shape
    V, NN, NPHI = tots.shape[-1], tots.shape[2], phis.shape[2]
    NT = triton.cdiv(T, CHUNK)
    dev = qcs.device
    dqt = torch.empty(B, T, H, K, device=dev, dtype=torch.float32)
    dlam = torch.empty(B, T, H, NL, device=dev, dtype=torch.float32)
    dqcs = torch.empty_like(qcs)
    common = dict(K=K, V=V, BK=pow2(K), BV=pow2(V), C=CHUNK, num_warps=8)
    tree_readout_bwd_kernel[(NT, B * H)](qcs, lam, phis, tots, do, dqt, dlam, dqcs, B, T, H, NL, P, NN, NPHI,
                                         **common)
    dtots = torch.zeros(tots.shape, device=dev, dtype=torch.float32)
    dphis = torch.zeros(phis.shape, device=dev, dtype=torch.float32)
    # the buckets that real chunks read, the longest sums first
    items = [(m, j) for m in range(NL - 1, -1, -1) for j in range(0, P >> m, 2) if ((j + 1) << m) < NT]
    work = torch.tensor(items, dtype=torch.int32, device=dev).reshape(-1, 2)
    tree_node_grad_kernel[(len(items), B * H, 2)](work, qcs, lam, do, dqcs, dtots, dphis, B, T, H, NL, P, NN, NPHI,
                                                  NT, **common)
    return dqt, dlam, dtots, dphis
