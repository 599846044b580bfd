"""Fix-up of per-chunk states computed before their start was known (context parallelism,
``cp_overlap.py``): states_n += P_n D, and the rows that depend on them.

A state pass run from a zero start (or a zero final-state gradient) with the identity carried
alongside gives per chunk n the product P_n [K, K] that maps the unknown D [K, V] to chunk n's
state. Once D is known, one program per (V block, chunk, batch*head) forms corr = P_n D[:, block]
in registers and adds it to the stored state, and optionally adds sign * row_scale * (R_n corr)
to a per-token target (U = U0 - W corr in the forward; dU = dU0 + exp(gl - gam) K corr in the
backward). Memory traffic: one read of P, one read and write of the states.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import CHUNK, flags_given


@flags_given(HAS_ROWS="rows_ptr", HAS_G="gam_ptr")
@triton.jit
def state_fixup_kernel(st_ptr, p_ptr, d_ptr, rows_ptr, gam_ptr, tg_ptr, sign, T, NT, H,
                       K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       C: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_G: tl.constexpr):
    """st [B, NT, H, K, V] += P [B, H, NT, K, K] @ D [B, H, K, V] (fp32); with HAS_ROWS also
    tg [B, T, H, V] += sign * exp(gl - gam) (rows [B, T, H, K] @ corr) per chunk (the decay with
    HAS_G only; gl = gam at the chunk's last row). Grid (cdiv(V, BV), NT, B*H)."""
    iv = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    rk = tl.arange(0, BK)
    mk = rk < K
    rv = iv * BV + tl.arange(0, BV)
    mv = rv < V
    mkv = mk[:, None] & mv[None, :]
    p = tl.load(p_ptr + (bh * NT + n) * K * K + rk[:, None] * K + rk[None, :], mask=mk[:, None] & mk[None, :],
                other=0.0)
    d = tl.load(d_ptr + bh * K * V + rk[:, None] * V + rv[None, :], mask=mkv, other=0.0)
    corr = tl.dot(p, d.to(p.dtype)).to(tl.float32)
    sp = st_ptr + ((b * NT + n) * H + h) * K * V + rk[:, None] * V + rv[None, :]
    s = tl.load(sp, mask=mkv, other=0.0).to(tl.float32) + corr
    tl.store(sp, s.to(st_ptr.dtype.element_ty), mask=mkv)
    if HAS_ROWS:
        base = b * T * H + h
        rt = n * C + tl.arange(0, C)
        mt = rt < T
        r = tl.load(rows_ptr + base * K + rt[:, None] * H * K + rk[None, :], mask=mt[:, None] & mk[None, :],
                    other=0.0)
        x = tl.dot(r, corr.to(r.dtype)).to(tl.float32) * sign
        if HAS_G:
            gam = tl.load(gam_ptr + base + rt * H, mask=mt, other=0.0)
            gl = tl.load(gam_ptr + base + tl.minimum(n * C + C - 1, T - 1) * H)
            x = x * tl.exp(gl - gam)[:, None]
        tp = tg_ptr + base * V + rt[:, None] * H * V + rv[None, :]
        t = tl.load(tp, mask=mt[:, None] & mv[None, :], other=0.0).to(tl.float32) + x
        tl.store(tp, t.to(tg_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])


def state_fixup(states, prods, delta, cfg, rows=None, target=None, sign=1.0, gam=None):
    """In place: states [B, NT, H, K, V] += prods [B, H, NT, K, K] @ delta [B, H, K, V] per chunk;
    with ``rows`` [B, T, H, K], target [B, T, H, V] += sign * decay * (rows @ correction) per chunk
    (decay exp(gl - gam) when ``gam`` is given)."""
    B, NT, H, K, V = states.shape
    T = NT * CHUNK if rows is None else rows.shape[1]
    grid = (triton.cdiv(V, cfg.BVF), NT, B * H)
    state_fixup_kernel[grid](states, prods, delta.float().contiguous(), rows, gam, target, float(sign), T, NT, H,
                             K=K, V=V, BK=cfg.BK, BV=cfg.BVF, C=CHUNK, **cfg.launch("state_fixup"))
