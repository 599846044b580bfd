"""Backend "triton" of the log-linear ops: one pass for the levels inside a chunk, one launch for the others.

With chunks of C = 64 tokens aligned to the global positions (c = log2 C = 6):

- levels 0..c never leave a chunk: o_intra = scale (Lambda * Aeff) V per chunk, Lambda[t, s] =
  lambda[t, level(t, s)] and Aeff = (causal * decay * Q K^T) Tm diag(beta) (the base mixer's intra-chunk
  matrix through the WY transform; Mamba-2: no Tm), ``triton_intra``;
- every level l > c is the chunk-level scan of its run R_l (the base recurrence reset every 2^l tokens)
  read out with the weights w_l = lambda_l - lambda_{l+1}: ``triton_levels`` runs all of them in one
  launch that shares the per-chunk tiles (effective queries qt = diag(Gam) Q - (causal * decay * Q K^T)
  W, W, Ut, gam) between the levels.

Summing both gives sum_s lambda[t, level(t, s)] (write_s carried to t)^T q_t, the definition (the run
decomposition of chunk.py, with R_l's intra-chunk part moved into the one masked pass). The WY terms
(gam, Tm, W, Ut) come from the base op's kernels (``kernels/triton/wy``), whose backward also takes the
gradient of Tm diag(beta). Forward: wy_fwd -> intra_forward (o, qt) -> levels_forward (adds to o).
Backward: wy_apply (W, Ut again from the saved gam, Tm) -> levels_backward (recomputes the level
states) -> intra_backward -> wy_bwd. Work: about one base op plus (log2(T) - c) chunk scans of ~3 C K V
flops per chunk each way.

From position 0, or from an aligned block of chunks with incoming run states (a CP rank's shard:
``tree_serves``), log-linear Gated DeltaNet takes the levels above c from the transition tree instead
(``transition_tree``, ``triton_tree``: no sequential scan per level; CONFIG["TREE"], TREE_BUDGET), and from
position 0 log-linear Mamba-2 can take them from Fenwick block totals (``scalar_tree``, CONFIG["SCALAR_TREE"], off).

Needs position_offset a multiple of C (ops.py first brings an unaligned start to the next chunk with the
per-level "torch" path: fewer than C tokens).
"""
from __future__ import annotations

import torch

from ..triton.common import CHUNK
from ..triton.ops import _Cfg, _chunk_suffix_sum, aligned_input
from ..triton.wy import wy_apply, wy_bwd, wy_fwd
from . import triton_levels
from .chunk import (
    _last_block_states,
    add_weight_differences_grad,
    runs_from_slots,
    slots_from_runs,
    weight_differences,
)
from .levels import levels_needed
from .scalar_tree import tree_levels
from .transition_tree import tree_backward, tree_bytes, tree_depth, tree_forward, tree_serves
from .triton_intra import intra_backward, intra_forward
from .triton_levels import levels_backward, levels_forward


class _FusedLogLinear(torch.autograd.Function):
    """(o in q's dtype, final run states of the levels above c (fp32) or None). g, beta, lam, s0 arrive fp32 and
    contiguous; lam [B, T, H, L]; nl: the levels above the chunk (top - c, may be 0), whose weights are
    lam[..., c+1 : c+1+nl] (a view: their differences w, the level scans' weights, are formed here, without autograd,
    and their gradient mapped back, so no [B, T, H, L] temporaries pass through autograd)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, lam, s0, scale, n0, hi, nl, want_final, train, tree, exchange=None):
        cfg = _Cfg(k.shape[-1], v.shape[-1], gated=True)
        gam, tm, w, ut = wy_fwd(k, v, g, beta, cfg)
        o, qt = intra_forward(q, k, v, w, tm, beta, gam, lam, hi, scale)
        st = ck = seg = hs = None
        lvl = lam[..., hi + 1: hi + 1 + nl]
        if nl and tree:  # the transition tree instead of the level scans (tree_serves)
            # KEEP_H: the tree and the queries each bucket read stay for the backward (else it forms them again)
            # the readout writes o in q's dtype itself (no fp32 o to cast afterwards)
            out = torch.empty(o.shape, device=o.device, dtype=q.dtype)
            with torch.no_grad():
                st, ctx.tree_kept = tree_forward(o, qt, k, w, v if ut is None else ut, gam, lvl, scale, want_final,
                                                 keep=train and bool(triton_levels.CONFIG["KEEP_H"]), s0=s0, n0=n0,
                                                 out=out, exchange=exchange)
            o = out
            if exchange is not None:   # (the incoming states the ranks' exchange formed, for the backward)
                s0 = exchange.s0
        elif nl:
            u = v if ut is None else ut
            lw = weight_differences(lvl)   # what the scans read (the tree reads lvl itself)
            # a backward that has to cut the sequence into segments (very long T) starts each from run states
            # this scan stores on the way (``backward_plan``); with KEEP_H it keeps every level state instead
            seg = triton_levels.backward_plan(qt, u, nl)[1] if train else None
            keep = train and triton_levels.keeps_states(qt, u, nl)
            st, ck, hs = levels_forward(o, qt, k, w, u, gam, lw, s0, scale, n0, want_final, seg, keep)
        del w, ut   # the backward makes them again (wy_apply): not kept beside o
        ctx.save_for_backward(q, k, v, beta, lam, s0, gam, tm, qt, ck, hs)
        ctx.scale, ctx.n0, ctx.hi, ctx.nl, ctx.seg, ctx.tree, ctx.exchange = scale, n0, hi, nl, seg, tree, exchange
        # final states that no loss reads arrive in the backward as None, not as zeros whose share (a gradient pass
        # through the final states' nodes) would be formed for nothing
        ctx.set_materialize_grads(False)
        return o.to(q.dtype), st  # (dO then arrives in q's dtype too: half the reads of an fp32 one; the tree's o
        # is in it already)

    @staticmethod
    def backward(ctx, do, dst):
        q, k, v, beta, lam, s0, gam, tm, qt, ck, hs = ctx.saved_tensors
        scale, n0, hi, nl = ctx.scale, ctx.n0, ctx.hi, ctx.nl
        # (the WY backward of this op takes its launch from the log-linear settings: it also reads dX and adds dV)
        lcfg = triton_levels.CONFIG
        cfg = _Cfg(k.shape[-1], v.shape[-1], gated=True,
                   overrides={"warps_wyb": lcfg["warps_wy_bwd"], "stages_wyb": lcfg["stages_wy_bwd"]})
        B, T, H, K = q.shape
        w, ut = wy_apply(k, v, beta, gam, tm, cfg)
        do = torch.zeros(*v.shape, device=v.device, dtype=torch.float32) if do is None else do.contiguous()
        f32 = dict(device=q.device, dtype=torch.float32)
        # the level weights' gradient, written in place: the levels above the chunk by the tree (or from the scans'
        # dw), levels 0..hi by the intra pass, the rest (levels no query reaches) stay 0
        dlam = torch.zeros_like(lam) if not nl or ctx.tree else None   # (the scans': after their peak)
        lvl = lam[..., hi + 1: hi + 1 + nl]
        if nl and ctx.tree:
            dqt, dk, dw, du, dgam, _, ds0 = tree_backward(qt, k, w, v if ut is None else ut, gam, lvl, scale, do,
                                                          dst, ctx.tree_kept, s0, n0,
                                                          dlam=dlam[..., hi + 1: hi + 1 + nl], exchange=ctx.exchange)
            if ctx.exchange is not None:
                ds0 = None   # (s0 was formed inside the call, not given)
            ctx.tree_kept = None
        elif nl:
            dst = None if dst is None else dst.contiguous().float()
            dqt, dk, dw, du, dgam, dlw, ds0 = levels_backward(qt, k, w, v if ut is None else ut, gam,
                                                              weight_differences(lvl), s0, do, dst, scale, n0,
                                                              s0 is not None, ck, ctx.seg, hs)
            del hs
            dlam = torch.zeros_like(lam)
            add_weight_differences_grad(dlam[..., hi + 1: hi + 1 + nl], dlw)
            del dlw
        else:
            dqt, dk, dgam = torch.zeros(B, T, H, K, **f32), torch.zeros(B, T, H, K, **f32), torch.zeros(B, T, H, **f32)
            dw = None if w is None else torch.zeros(B, T, H, K, **f32)
            du, ds0 = torch.zeros(*v.shape, **f32), None
        # every buffer is dropped after its last reader (ut: the level scans), so the peak stays at the level
        # scans or the intra pass (docs/loglinear.md, "Memory"; lctrain.bench.loglinear_memory lists it)
        del ut
        dv_intra, dq, dx = intra_backward(q, k, v, w, tm, beta, gam, lam, hi, scale, do, dqt, dk, dw, dgam, dlam)
        del dqt
        if w is None:
            dv, dbeta, dg = du.add_(dv_intra).to(v.dtype), None, _chunk_suffix_sum(dgam)
            dk = dk.to(k.dtype)
        else:
            # the WY backward finishes both in their dtypes: dv = its share + dv_intra, rounded once, and dk
            # completed into a k-dtype buffer (no fp32 add and casts over [B, T, H, D] afterwards). (With dv_intra's
            # tile it spills 232 bytes for sm_90 at the base op's V block of 64; V blocks of 32, which do not spill,
            # compute wrong values on an H200, Triton 3.6: docs/kernels-notes.md, and the eleventh session's call 2)
            dk_out = torch.empty_like(k)
            dv, dbeta, dg = wy_bwd(k, v, beta, gam, tm, dw, du, dk, dgam, cfg, dx=dx, dv_add=dv_intra, dk_out=dk_out)
            dk = dk_out
        del du, dw, dx, w, dv_intra, dgam
        return (dq, dk, dv, dg, dbeta, dlam, ds0, None, None, None, None, None, None, None, None)


def takes_gdn_tree(q, v, beta, position_offset: int, top: int) -> bool:
    """Whether Gated DeltaNet's levels above the chunk come from the transition tree (``transition_tree``; TREE=1):
    from position 0 or from an aligned block of chunks (``tree_serves``: CP ranks' power-of-two shards), where the
    tree's buffers fit TREE_BUDGET."""
    B, T, H, K = q.shape
    c = CHUNK.bit_length() - 1
    return (beta is not None and top > c and bool(triton_levels.CONFIG["TREE"])
            and tree_serves(position_offset // CHUNK, T, top - c)
            and tree_bytes(B, T, H, K, v.shape[-1], tree_depth(T), q.element_size()) <= triton_levels.TREE_BUDGET)


def fused_by_levels(base, q, k, v, g, beta, level_weights, *, scale, run_init, position_offset: int, top: int,
                    want_runs: bool, exchange=None):
    """The log-linear op from its incoming run states (``run_init`` [B, H, >= top+1, K, V] or None, as
    chunk.loglinear_by_levels takes them) for a call starting on a chunk boundary (position_offset % C ==
    0). ``base``: the public base op (the final runs of the levels inside the last chunk). Returns (o in
    q's dtype, final run states [B, H, top+1, K, V] fp32 or None). ``exchange`` (a CP rank whose call takes the
    transition tree, ``takes_gdn_tree``; run_init then None): the incoming states come from the other ranks inside
    the call (``transition_tree.tree_forward``)."""
    p0 = position_offset
    K = q.shape[-1]
    c = CHUNK.bit_length() - 1
    scale = float(K ** -0.5 if scale is None else scale)
    runs = []
    if want_runs:  # blocks of <= C tokens start inside this call: their runs come from the last block alone
        gates = (g,) if beta is None else (g, beta)
        # (the Triton base op: a dozen launches, where the torch one was ~150 small operations of host time that a
        # CP rank's GPU waited on)
        runs = [s.float() for s in _last_block_states(base, k, v, gates, p0, range(min(c, top) + 1), CHUNK,
                                                      backend="triton")]
    s0 = None if run_init is None or top <= c else run_init[:, :, c + 1: top + 1].float().contiguous()
    f32 = lambda x: aligned_input(x, torch.float32)  # noqa: E731  (ALIGN_INPUTS in triton/ops.py: why aligned)
    # the levels above c can come from block totals, no level scans: for a scalar decay (Mamba-2, SCALAR_TREE=1,
    # from position 0) outside the Function (scalar_tree); for Gated DeltaNet (TREE=1) inside it (transition_tree),
    # from position 0 or from an aligned block with incoming states (tree_serves: CP ranks), where the tree's
    # buffers fit TREE_BUDGET
    from_zero = p0 == 0 and s0 is None and top > c
    cfg = triton_levels.CONFIG
    tree = beta is None and from_zero and bool(cfg["SCALAR_TREE"])
    gdn_tree = takes_gdn_tree(q, v, beta, p0, top)
    if exchange is not None and not (gdn_tree and run_init is None):
        raise ValueError("fused_by_levels: an exchange of incoming states needs the transition tree and no run_init")
    train = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                            for x in (q, k, v, g, beta, level_weights, run_init))
    nl = 0 if tree else max(top - c, 0)   # the levels above the chunk the Function takes (none: the scalar tree's)
    o, st = _FusedLogLinear.apply(aligned_input(q), aligned_input(k), aligned_input(v), f32(g), f32(beta),
                                  f32(level_weights), s0, scale, p0 // CHUNK, min(c, top), nl,
                                  bool(want_runs and top > c and not tree), train, gdn_tree, exchange)
    if tree:
        o_levels, st = tree_levels(q, k, v, f32(g), f32(level_weights), scale, top - c, want_runs)
        o = (o.float() + o_levels).to(q.dtype)
    if want_runs and top > c:
        runs += list(st.unbind(dim=2))
    return o, (torch.stack(runs, dim=2) if want_runs else None)


def fused_loglinear(base, q, k, v, g, beta, level_weights, *, scale, initial_state, output_final_state: bool,
                    position_offset: int):
    """The log-linear op from its incoming level states (ops.py's layout) for a call starting on a chunk
    boundary. Returns (o in q.dtype, final level states [B, H, L, K, V] fp32 or None)."""
    p0 = position_offset
    top = levels_needed(p0 + q.shape[1]) - 1
    run_init = None if initial_state is None else runs_from_slots(initial_state.float(), p0)
    o, runs = fused_by_levels(base, q, k, v, g, beta, level_weights, scale=scale, run_init=run_init,
                              position_offset=p0, top=top, want_runs=output_final_state)
    final = slots_from_runs(runs, level_weights.shape[-1]) if output_final_state else None
    return o, final
