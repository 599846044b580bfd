"""Deltaformer's u-pass, chunkwise: a triangular solve per chunk, and its exact backward.

Layout here is head-major: k [B, H, T, K], v / u [B, H, T, V], beta [B, H, T], all in the compute
dtype (float32, or float64 in tests). With P[t, j] = softmax_{j<t}(scale k_t . k_j) (zero for j >= t),
the u-pass u_t = v_t - beta_t sum_j P[t, j] u_j is the unit lower-triangular system
(I + diag(beta) P) u = v. For the chunk c = [s, e), with the rows of P normalised over ALL their
earlier keys (earlier chunks and the strictly earlier part of the chunk):

    (I + diag(beta_c) P[c, c]) u_c = v_c - beta_c * (P[c, :s] @ u[:s])

so each chunk needs only the earlier u and a c x c solve. Per chunk the "statistics" are
w_prev = P[c, :s] @ u[:s], the intra-chunk block P[c, c] and the row log-sum-exp; ``torch_chunk_stats``
computes them from a [c, e] score block, the Triton kernel (``triton_fwd.py``) streams the earlier
keys with an online softmax instead. The rest (the solve) is shared.

Backward, for the gradient gu on u (exact; nothing of size T x T is kept, rows are recomputed from
k and the saved log-sum-exp). The adjoint d of u solves the transposed system
(I + diag(beta) P)^T d = gu, chunk by chunk from the last one:

    d_c = solve((I + diag(beta_c) P[c, c])^T, gu_c - P[later, c]^T (beta d)[later])

so the reverse loop solves chunk c and then *pushes* its rows' share onto the earlier chunks'
right-hand sides: rhs[:s] -= P[c, :s]^T (beta d)_c. That is all the loop does besides
dv = d and dbeta_t = -w_t . d_t (w_t = sum_j P[t, j] u_j, saved by the forward). The gradient on
the keys needs only final quantities, so it runs once after the loop, over the whole triangle
(``key_grads``): with g_t = -beta_t d_t,
    dS[t, j] = P[t, j] (g_t . u_j - g_t . w_t)      (softmax backward; S = scale k k^T)
    dk = scale (dS + dS^T) k.
A backend is the triple ``Stages(stats, push, key_grads)``: torch here, Triton in
``triton_fwd.py`` / ``triton_bwd.py``.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, NamedTuple

import torch

NEG = -1e30  # finite "minus infinity": keeps the softmax and its gradient free of inf - inf


def _row_probs(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, lse: torch.Tensor | None):
    """P[t, j] for the scores block [..., rows, cols]: strictly causal (j < t); normalised with the
    given lse, or over the block itself when lse is None. Returns (P, lse)."""
    allowed = cols[None, :] < rows[:, None]
    scores = scores.masked_fill(~allowed, NEG)
    if lse is None:
        m = scores.amax(-1, keepdim=True)
        l = torch.exp(scores - m).masked_fill(~allowed, 0.0).sum(-1, keepdim=True)
        lse = torch.where(l > 0, m + torch.log(l.clamp_min(1e-300)), torch.zeros_like(m)).squeeze(-1)
    p = torch.exp(scores - lse[..., None]).masked_fill(~allowed, 0.0)
    return p, lse


def torch_chunk_stats(k, u, s: int, e: int, scale: float):
    """(w_prev [B, H, c, V], P[c, c] [B, H, c, c], lse [B, H, c]) for the chunk [s, e); u[:, :, :s]
    must hold the earlier chunks' u."""
    rows = torch.arange(s, e, device=k.device)
    cols = torch.arange(e, device=k.device)
    scores = scale * (k[:, :, s:e] @ k[:, :, :e].transpose(-1, -2))
    p, lse = _row_probs(scores, rows, cols, None)
    w_prev = p[..., :s] @ u[:, :, :s]
    return w_prev, p[..., s:e], lse


def _solve_chunk(p_cc, beta_c, rhs, transpose: bool = False):
    """Solve (I + diag(beta_c) P_cc) x = rhs, or its transpose; P_cc is strictly lower triangular."""
    A = beta_c[..., None] * p_cc
    if transpose:
        return torch.linalg.solve_triangular(A.transpose(-1, -2), rhs, upper=True, unitriangular=True)
    return torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)


StatsFn = Callable[[torch.Tensor, torch.Tensor, int, int, float], tuple]  # (k, u, s, e, scale) -> stats


def torch_chunk_solve_t(p_cc, beta, rhs, dv, bd, s: int, e: int):
    """Chunk [s, e)'s adjoint solve, in place: d from (I + diag(beta_c) P[c, c])^T d = rhs[s:e],
    dv[s:e] = d and bd[s:e] = beta_c d."""
    d = _solve_chunk(p_cc, beta[:, :, s:e], rhs[:, :, s:e], transpose=True)
    dv[:, :, s:e] = d
    bd[:, :, s:e] = beta[:, :, s:e, None] * d


def torch_chunk_solve(p_cc, w_prev, beta, v, u, w, s: int, e: int, u_copy=None):
    """Chunk [s, e)'s solve from its statistics, in place: u[s:e] from
    (I + diag(beta_c) P[c, c]) u_c = v_c - beta_c w_prev, w[s:e] = w_prev + P[c, c] u_c, and u_c
    into u_copy (another dtype) when given."""
    u[:, :, s:e] = _solve_chunk(p_cc, beta[:, :, s:e], v[:, :, s:e] - beta[:, :, s:e, None] * w_prev)
    w[:, :, s:e] = w_prev + p_cc @ u[:, :, s:e]
    if u_copy is not None:
        u_copy[:, :, s:e] = u[:, :, s:e]


@torch.no_grad()
def chunk_forward(k, v, beta, scale: float, chunk_size: int, stats: StatsFn = torch_chunk_stats, on_chunk=None,
                  stats_u_dtype: torch.dtype | None = None, solve=torch_chunk_solve):
    """(u [B, H, T, V], lse [B, H, T], w [B, H, T, V]) in v's dtype; ``stats`` computes a chunk's
    statistics; w_t = sum_j P[t, j] u_j (kept for the backward). ``on_chunk(e, u)`` is called after
    each chunk [s, e) is solved (context parallelism streams the finished u from there).
    ``stats_u_dtype`` (``kernel_dots="half"``): ``stats`` reads a copy of u in that dtype, kept up
    to date chunk by chunk (half the bytes for the kernels that stream the earlier u). ``solve``:
    a chunk's solve from its statistics (``torch_chunk_solve``'s contract)."""
    B, H, T, _ = k.shape
    u = torch.empty_like(v)
    w = torch.empty_like(v)
    lse = v.new_zeros(B, H, T)
    u_stats = u if stats_u_dtype is None else torch.empty(u.shape, dtype=stats_u_dtype, device=u.device)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        w_prev, p_cc, lse_c = stats(k, u_stats, s, e, scale)
        lse[:, :, s:e] = lse_c
        solve(p_cc, w_prev, beta, v, u, w, s, e, None if u_stats is u else u_stats)
        if on_chunk is not None:
            on_chunk(e, u)
    return u, lse, w


def chunk_probs(k, lse, s: int, e: int, scale: float):
    """The intra-chunk block P[c, c] of the chunk [s, e), recomputed from k and the row lse."""
    rows = torch.arange(s, e, device=k.device)
    kc = k[:, :, s:e]
    return _row_probs(scale * (kc @ kc.transpose(-1, -2)), rows, rows, lse[:, :, s:e])[0]


def merge_partials(m, l, acc):
    """Online-softmax states of disjoint key ranges [B, H, NS, rows(, V)] -> one state [B, H, rows(, V)]."""
    m_all = m.amax(2)
    a = torch.exp(m - m_all[:, :, None])
    return m_all, (l * a).sum(2), (acc * a[..., None]).sum(2)


def torch_block_partials(kr, kk, uk, scale: float):
    """Online-softmax state (m, l, acc) of the rows kr [B, H, L, K] over keys kk [B, H, G, K] with
    values uk [B, H, G, V], every key earlier than every row (context parallelism: a piece of an
    earlier rank's keys and u)."""
    sc = scale * (kr @ kk.transpose(-1, -2))
    m = sc.amax(-1)
    p = torch.exp(sc - m[..., None])
    return m, p.sum(-1), p @ uk


def torch_pull(kt, lse_t, bd_t, bdw_t, k, u, rhs, dk, scale: float):
    """Later rows t (kt [B, H, G, K], their lse, bd = beta d, bdw = bd . w) onto the earlier keys k /
    values u [B, H, L, *] (every key before every row), in place: rhs -= P^T bd and
    dk += scale dS^T kt with dS[t, j] = -P[t, j] (bd_t . u_j - bdw_t)."""
    p = torch.exp(scale * (kt @ k.transpose(-1, -2)) - lse_t[..., None])
    rhs -= p.transpose(-1, -2) @ bd_t
    ds = -p * (bd_t @ u.transpose(-1, -2) - bdw_t[..., None])
    dk += scale * (ds.transpose(-1, -2) @ kt)


def torch_rows_vs_keys(k, lse, bd, bdw, kb, ub, dk, scale: float):
    """The row half of dk for the rows k [B, H, L, K] against earlier keys kb / values ub
    [B, H, G, *] (every key before every row), in place: dk += scale dS kb."""
    p = torch.exp(scale * (k @ kb.transpose(-1, -2)) - lse[..., None])
    ds = -p * (bd @ ub.transpose(-1, -2) - bdw[..., None])
    dk += scale * (ds @ kb)


def torch_chunk_push(k, lse, bd, rhs, s: int, e: int, scale: float):
    """Chunk [s, e)'s rows, their adjoint final, push onto the earlier chunks' right-hand sides (in
    place): rhs[:s] -= P[c, :s]^T bd with bd = beta_c d_c."""
    if s == 0:
        return
    p = torch.exp(scale * (k[:, :, s:e] @ k[:, :, :s].transpose(-1, -2)) - lse[:, :, s:e, None])
    rhs[:, :, :s] -= p.transpose(-1, -2) @ bd


def torch_key_grads(k, u, lse, bd, bdw, scale: float, chunk_size: int):
    """dk = scale (dS + dS^T) k with dS[t, j] = -P[t, j] (bd_t . u_j - bdw_t) (j < t), bd = beta d,
    bdw_t = bd_t . w_t; a chunk of rows at a time."""
    T = k.shape[2]
    dk = torch.zeros_like(k)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        rows = torch.arange(s, e, device=k.device)
        cols = torch.arange(e, device=k.device)
        kc, bdc = k[:, :, s:e], bd[:, :, s:e]
        p, _ = _row_probs(scale * (kc @ k[:, :, :e].transpose(-1, -2)), rows, cols, lse[:, :, s:e])
        ds = -p * (bdc @ u[:, :, :e].transpose(-1, -2) - bdw[:, :, s:e, None])
        dk[:, :, s:e] += scale * (ds @ k[:, :, :e])
        dk[:, :, :e] += scale * (ds.transpose(-1, -2) @ kc)
    return dk


class Stages(NamedTuple):
    """A backend of the chunked u-pass: the forward statistics of a chunk, the intra-chunk block
    P[c, c] from k and lse (backward), the backward push of a solved chunk onto the earlier
    right-hand sides, the key gradients after the backward loop, the three blocks context
    parallelism adds (rows against another rank's keys), and the forward solve of a chunk from its
    statistics and the backward's adjoint solve of a chunk."""
    stats: Callable
    probs: Callable
    push: Callable
    key_grads: Callable
    block_partials: Callable
    pull: Callable
    rows_vs_keys: Callable
    solve: Callable = torch_chunk_solve
    solve_t: Callable = torch_chunk_solve_t


TORCH_STAGES = Stages(torch_chunk_stats, chunk_probs, torch_chunk_push, torch_key_grads, torch_block_partials,
                      torch_pull, torch_rows_vs_keys)


@torch.no_grad()
def chunk_backward(k, beta, u, lse, w, gu, scale: float, chunk_size: int, stages: Stages = TORCH_STAGES,
                   rhs=None, on_chunk=None, half_copies: torch.dtype | None = None):
    """(dk, dv, dbeta, bd) of sum(u * gu) (see the module doc), bd = beta d. ``rhs`` (context
    parallelism): gu with the shares of tokens after these T already subtracted (used in place of a
    copy of gu, and overwritten). ``on_chunk(s, bd)`` is called after each chunk [s, e) is solved
    (the reverse loop) with bd [B, H, T, V], final from row s on. bdw_t = bd_t . w_t.
    ``half_copies`` (``kernel_dots="half"``, Triton stages): the push and the key gradients read copies
    of bd (kept up to date chunk by chunk) and of u in that dtype: the kernels round both to it before
    their only use, a dot, so the results are the same bit for bit with half the bytes streamed."""
    T = k.shape[2]
    rhs = gu.clone() if rhs is None else rhs   # gu - (contributions of later rows), completed chunk by chunk
    dv = torch.empty_like(u)
    bd = torch.empty_like(u)
    bd_dots = bd if half_copies is None else torch.empty_like(u, dtype=half_copies)
    for s in reversed(range(0, T, chunk_size)):
        e = min(s + chunk_size, T)
        stages.solve_t(stages.probs(k, lse, s, e, scale), beta, rhs, dv, bd, s, e)
        if bd_dots is not bd:
            bd_dots[:, :, s:e].copy_(bd[:, :, s:e])
        stages.push(k, lse, bd_dots[:, :, s:e], rhs, s, e, scale)
        if on_chunk is not None:
            on_chunk(s, bd)
    dbeta = -(w * dv).sum(-1)                  # per-row reductions once, not per chunk (launches)
    bdw = (bd * w).sum(-1)
    dk = stages.key_grads(k, u if half_copies is None else u.to(half_copies), lse, bd_dots, bdw, scale,
                          chunk_size)
    return dk, dv, dbeta, bd, bdw


class _Tf32Matmuls:
    """float32 matmuls on TF32 tensor cores inside the block (on for half-precision inputs, whose
    rounding already dominates; the Triton statistics use TF32 dots too)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        if self.on:
            torch.backends.cuda.matmul.allow_tf32 = self.saved


HALF_DOTS: ContextVar = ContextVar("deltaformer_half_dots", default=None)


@contextmanager
def half_dots(dtype: torch.dtype | None):
    """Inside: the Triton kernels round their dot operands to ``dtype`` (bf16 / fp16; float32
    accumulation, float32 tensors in memory); None leaves them as they are (TF32 / float32)."""
    token = HALF_DOTS.set(dtype)
    try:
        yield
    finally:
        HALF_DOTS.reset(token)


class UPass(torch.autograd.Function):
    """u = u_pass(k, v, beta) on [B, T, H, *] inputs; returns u [B, T, H, V] in the compute dtype.
    Forward: ``chunk_forward`` with the backend's statistics; backward: the exact ``chunk_backward``
    with its push and key gradients (``Stages``, torch or Triton). Saves k, beta, u, w and the row
    log-sum-exp (O(T), no T x T tensor). With bf16/fp16 inputs on CUDA the float32 matmuls run in TF32
    (``tf32``: always, ``kernel_dots="tf32"``); ``half``: a half dtype the Triton kernels round their
    dot operands to (``half_dots``), or None; then k (the inputs' half-precision numbers, unchanged)
    and the copies of u the kernels stream are kept in that dtype: half the bytes."""

    @staticmethod
    def forward(ctx, k, v, beta, scale: float, chunk_size: int, stages: Stages, dtype: torch.dtype,
                half: torch.dtype | None = None, tf32: bool = False):
        kh = k.transpose(1, 2).to(dtype if half is None else half).contiguous()
        vh = v.transpose(1, 2).to(dtype).contiguous()
        bh = beta.transpose(1, 2).to(dtype).contiguous()
        ctx.tf32 = tf32 or (k.is_cuda and k.dtype in (torch.bfloat16, torch.float16))
        ctx.half = half
        with _Tf32Matmuls(ctx.tf32), half_dots(half):
            u, lse, w = chunk_forward(kh, vh, bh, scale, chunk_size, stages.stats, stats_u_dtype=half,
                                      solve=stages.solve)
        ctx.save_for_backward(kh, bh, u, lse, w)
        ctx.scale, ctx.chunk_size, ctx.stages = scale, chunk_size, stages
        ctx.in_dtypes = (k.dtype, v.dtype, beta.dtype)
        return u.transpose(1, 2)

    @staticmethod
    def backward(ctx, gu):
        kh, bh, u, lse, w = ctx.saved_tensors
        guh = gu.transpose(1, 2).to(u.dtype).contiguous()
        with _Tf32Matmuls(ctx.tf32), half_dots(ctx.half):
            dk, dv, dbeta, _, _ = chunk_backward(kh, bh, u, lse, w, guh, ctx.scale, ctx.chunk_size, ctx.stages,
                                                 half_copies=ctx.half)
        kd, vd, bd = ctx.in_dtypes
        return (dk.transpose(1, 2).to(kd), dv.transpose(1, 2).to(vd), dbeta.transpose(1, 2).to(bd),
                None, None, None, None, None, None)
