"""The Triton chunk op for context parallelism with its state passes folded into its own passes.

The plain CP schedule (parallel/context_parallel.py) runs an extra state pass before the local
forward (to send (A, B) to later ranks) and an extra state-gradient pass before the local backward
(to send G to earlier ranks): two more sequential walks over the shard's chunks on the critical
path. Both are avoidable because the chunk states are affine in the unknown:

forward   the state pass runs from a zero initial state and also carries the transition's prefix
          before every chunk (hp, ``state.state_fwd_prefix``): h = h0 + hp S_in and
          U = U0 - W (hp S_in), and its final state and A are exactly the (A, B) to share. So the
          pass runs first, ``link.start(A, B)`` exchanges (A, B) and returns S_in, one kernel
          (``fixup.py``) fixes h and U up in place, and the output stage runs as usual (launch
          key ``fuse_out=1``: the output kernel adds S_in's part itself, nothing is rewritten);
backward  the reverse pass runs from a zero final-state gradient and carries the suffix products
          (dhp, ``state.state_bwd_suffix``): dh = dh0 + dhp dS_out, dU = dU0 + decay (K (dhp dS_out))
          and its dS_in from zero is the shard's own G. ``link.end(G, A^T, u)`` exchanges G and
          returns dS_out; the fix-up and the remaining stages follow. The state recompute that the
          backward needs (per-chunk states are not kept) runs after the fix-up, so the per-chunk
          products dhp are freed before h is rebuilt (peak memory as the plain backward's).

Every rank then walks its chunks once per direction, concurrently with the other ranks; what CP
adds is the identity-carrying programs inside the same passes (more programs, the same chain
length), the fix-up kernel and the two small all-gathers. Two ranks need neither, since what they
wait for is known: rank 0 (``link.start_known``) starts from its own initial state, so it runs the
plain state pass from it and only sends its final state; the last rank without a gradient on its
final state (``link.end_known(u)``) has dS_out = 0, so it runs the plain reverse pass, whose
gradient of the incoming state is G, and only sends that.

``transition="pipeline"`` goes one step further for the other end of each chain: the last rank
(``link.start_first``) waits for S_in before its state pass (after its WY stage, which needs no
state) and rank 0 (``link.end_first``) for dS_out before its reverse pass (after the state
recompute and dv_local); both then run the plain passes from the exact state. At P = 2 no rank then
runs a prefix/suffix program or a fix-up: the ranks run the plain op's kernels, pipelined, and
CP adds rank 0's forward state pass and rank 1's reverse pass (less the state recompute that rank
0 does while it waits) to the critical path. Middle ranks (P > 2) run as under "overlap". ``link`` is the CP side (two
collectives); this module knows nothing of torch.distributed.
"""
from __future__ import annotations

import torch

from .common import CHUNK
from .dqdk import dqk as _dqk
from .fixup import state_fixup
from .ops import _Cfg, _check, _chunk_suffix_sum, aligned_input
from .output import dv_local as _dv_local
from .output import output_fwd as _output_fwd
from .state import state_bwd, state_bwd_suffix, state_fwd, state_fwd_prefix
from .wy import wy_apply as _wy_apply
from .wy import wy_bwd as _wy_bwd
from .wy import wy_fwd as _wy_fwd


class _Overlapped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, scale, link):
        cfg = _Cfg(k.shape[-1], v.shape[-1], gated=g is not None, fp32=k.dtype == torch.float32)
        gam, tm, w, ut = _wy_fwd(k, v, g, beta, cfg)
        u = ut if w is not None else v
        fix = None
        if link.start_known or link.start_first:
            # the plain pass from the exact incoming state, nothing to fix up: rank 0's is s0 (it then sends its
            # final state); with start_first (transition="pipeline", the last rank) it is waited for first
            B, _, H, K = k.shape
            s_in = s0 if link.start_known else aligned_input(link.start(
                None, torch.zeros(B, H, K, v.shape[-1], device=k.device, dtype=torch.float32)), torch.float32)
            h, vnew, st, _ = state_fwd(k, w, u, gam, s_in, cfg, store_h=True, store_vnew=True, store_final=True)
            if link.start_known:
                link.start(None, st)
        else:
            h, vnew, st, a, hp = state_fwd_prefix(k, w, u, gam, cfg)
            s_in = aligned_input(link.start(a, st), torch.float32)
            if cfg.values.get("fuse_out"):  # the output kernel adds S_in's part (hp read once, no write)
                fix = (hp, s_in.contiguous(), w)
            else:
                state_fixup(h, hp, s_in, cfg, rows=w, target=vnew if w is not None else None, sign=-1.0)
            st = st + a @ s_in
            del hp
        o = _output_fwd(q, k, vnew, h, gam, scale, cfg, fix=fix)
        del fix
        ctx.save_for_backward(q, k, v, g, beta, s_in, gam, tm)
        ctx.scale, ctx.link, ctx.has_s0 = scale, link, s0 is not None
        ctx.set_materialize_grads(False)
        return o, st

    @staticmethod
    def backward(ctx, do, dst_user):
        q, k, v, g, beta, s_in, gam, tm = ctx.saved_tensors
        scale = ctx.scale
        cfg = _Cfg(k.shape[-1], v.shape[-1], gated=g is not None, fp32=k.dtype == torch.float32)
        has_w = beta is not None
        # dO / the final-state gradient / what the link hands back may be views off a 16-byte boundary (ops.py)
        do = q.new_zeros(*q.shape[:3], v.shape[-1]) if do is None else aligned_input(do, q.dtype)
        w, ut = _wy_apply(k, v, beta, gam, tm, cfg)
        u = ut if has_w else v
        h = None
        if ctx.link.end_first:  # what needs no dS_out first (the plain backward's order), then wait for it
            h, vnew, _, _ = state_fwd(k, w, u, gam, s_in, cfg, store_h=True, store_vnew=True, store_final=False)
        dvl = _dv_local(q, k, do, gam, scale, cfg)
        u_user = aligned_input(dst_user, torch.float32)
        if ctx.link.end_known(u_user):  # dS_out = 0: the plain reverse pass, nothing to fix up
            dh, du, ds0 = state_bwd(q, k, w, do, dvl, gam, None, scale, cfg, store=True)
            del dvl
            ctx.link.end(ds0, None, None)
        elif ctx.link.end_first:  # the plain reverse pass from the exact dS_out: its dS_in is d s0
            B, _, H, K = k.shape
            dst = ctx.link.end(torch.zeros(B, H, K, v.shape[-1], device=k.device, dtype=torch.float32), None,
                               u_user)
            dh, du, ds0 = state_bwd(q, k, w, do, dvl, gam, aligned_input(dst, torch.float32), scale, cfg, store=True)
            del dvl
        else:
            dh, du, G, at, dhp = state_bwd_suffix(q, k, w, do, dvl, gam, scale, cfg)
            del dvl
            dst = ctx.link.end(G, at, u_user)
            ds0 = G
            if dst is not None:
                dst = aligned_input(dst, torch.float32)
                # dU gets exp(gl - gam) K dS (gl: gam at the chunk's last row), as in state_bwd_kernel
                state_fixup(dh, dhp, dst, cfg, rows=k, target=du, sign=1.0, gam=gam)
                ds0 = G + at @ dst
            del dhp
        if h is None:
            h, vnew, _, _ = state_fwd(k, w, u, gam, s_in, cfg, store_h=True, store_vnew=True, store_final=False)
        del u, ut
        dq, dk, dw, dgam = _dqk(q, k, vnew, do, h, dh, du if has_w else None, gam, scale, cfg)
        del h, dh, vnew
        if not has_w:
            dg = _chunk_suffix_sum(dgam).to(g.dtype) if g is not None else None
            dv, dbeta = du.to(v.dtype), None
        else:
            dv, dbeta, dg = _wy_bwd(k, v, beta, gam, tm, dw, du, dk, dgam, cfg)
        ds0 = ds0.to(torch.float32) if ctx.has_s0 else None
        return dq, dk, dv, dg, dbeta, ds0, None, None


def overlapped(q, k, v, g, beta, *, scale=None, initial_state=None, link, chunk_size=CHUNK):
    """o, final state of the chunk op (``g``/``beta`` None as the op has them) whose state passes
    call ``link.start(A, B_from_zero) -> S_in`` in the forward (``link.start(None, final_state)``
    where ``link.start_known``; ``link.start(None, zeros) -> S_in`` first where ``link.start_first``)
    and ``link.end(G, A^T, final_state_grad or None) -> dS_out or None`` in the backward
    (``link.end(G, None, None)`` where ``link.end_known(final_state_grad)``; ``link.end(zeros, None,
    final_state_grad)`` first where ``link.end_first``); see the module docstring. ``initial_state``
    (rank 0's) gets the gradient dS_in; no ``cu_seqlens``."""
    _check("context-parallel overlap", q, k, v, chunk_size)
    if k.shape[1] % CHUNK:
        raise ValueError(f"context-parallel overlap: T={k.shape[1]} must be a multiple of the chunk size {CHUNK}")
    dt = q.dtype
    scale = float(k.shape[-1] ** -0.5 if scale is None else scale)
    q, k, v = (aligned_input(x) for x in (q, k, v))
    g, beta, s0 = (aligned_input(x, torch.float32) for x in (g, beta, initial_state))
    o, st = _Overlapped.apply(q, k, v, g, beta, s0, scale, link)
    return o.to(dt), st
