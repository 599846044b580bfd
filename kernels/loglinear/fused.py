"""Backend "triton" of the log-linear ops: one pass for the levels inside a chunk, one launch for the others.

With chunks of C = 64 tokens aligned to the global positions (c = log2 C = 6):

- levels 0..c never leave a chunk: o_intra = scale (Lambda * Aeff) V per chunk, Lambda[t, s] =
  lambda[t, level(t, s)] and Aeff = (causal * decay * Q K^T) Tm (the base mixer's intra-chunk matrix,
  Tm = (I + L)^-1 diag(beta) the WY transform; Mamba-2: no Tm);
- every level l > c is the chunk-level scan of its run R_l (the base recurrence reset every 2^l
  tokens) read out with the weights w_l = lambda_l - lambda_{l+1}: ``triton_levels`` runs all of them
  in one launch that shares the per-chunk tiles (effective queries qt = diag(Gam) Q - (causal * decay *
  Q K^T) W, W, Ut, gam) between the levels.

Summing both gives sum_s lambda[t, level(t, s)] (write_s carried to t)^T q_t, the definition (the run
decomposition of chunk.py, with R_l's intra-chunk part moved into the one masked pass). The per-chunk
terms are computed in torch (chunks are independent: pieces of ``SEGMENT`` tokens, each recomputed in the
backward) and differentiated by autograd; the level scans, the part that grows with log T, are Triton
kernels with their own backward. Work: one base-op-like intra pass plus (log2(T) - c) chunk scans of
~3 C K V flops per chunk, in one launch each way.

Needs position_offset a multiple of C (ops.py first brings an unaligned start to the next chunk with the
per-level "torch" path: fewer than C tokens).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..chunk import _ChunkTerms, _to_chunks
from ..naive import compute_dtype
from ..triton.common import CHUNK
from .chunk import _last_block_states, level_weight_differences, runs_from_slots, slots_from_runs
from .levels import level_matrix, levels_needed

# Tokens per piece of the per-chunk torch pass (its [B, H, N, C, C] float32 temporaries scale with it).
SEGMENT = 32768


def _tokens(X: torch.Tensor, B: int, T: int, H: int) -> torch.Tensor:
    """[B, H, N, C, *D] chunk layout -> [B, T, H, *D] contiguous."""
    return X.movedim(1, 3).reshape(B, -1, H, *X.shape[4:])[:, :T].contiguous()


def chunk_parts(q, k, v, g, beta, level_weights, *, scale: float, top: int):
    """Per-chunk terms of one piece (starting on a chunk boundary): o_intra (fp32 [B, T, H, V]), the
    effective queries qt and W (q.dtype [B, T, H, K]; W None for Mamba-2), Ut (q.dtype [B, T, H, V]) and
    gam (fp32 [B, T, H], the in-chunk cumulative log-decay)."""
    B, T, H, _ = q.shape
    C = CHUNK
    dt = compute_dtype(q, k, v, g, beta, level_weights)
    terms = _ChunkTerms(k, v, g, beta, C, dt, q=q, keep_transform=True)
    P = terms.decay * (terms.Q @ terms.K.transpose(-1, -2))                # [B, H, N, C, C]
    aeff = P if terms.Tm is None else P @ terms.Tm
    hi = min(C.bit_length() - 1, top)
    idx = torch.arange(C, device=q.device)
    lv = level_matrix(idx, idx)                                             # level inside an aligned chunk
    lamc = _to_chunks(level_weights[..., : hi + 1], C, dt)                  # [B, H, N, C, hi+1]
    mask = torch.gather(lamc, -1, lv.clamp(0, hi).expand(*lamc.shape[:3], C, C)) * (lv >= 0)
    o_intra = scale * ((mask * aeff) @ terms.V)
    qt = terms.Gam[..., None] * terms.Q
    if terms.W is not None:
        qt = qt - P @ terms.W
    ut = terms.V if terms.Ut is None else terms.Ut
    gam = terms.gam.permute(0, 2, 3, 1).reshape(B, -1, H)[:, :T].float().contiguous()
    w = None if terms.W is None else _tokens(terms.W, B, T, H).to(q.dtype)
    return (_tokens(o_intra, B, T, H).float(), _tokens(qt, B, T, H).to(q.dtype), w,
            _tokens(ut, B, T, H).to(q.dtype), gam)


def _chunk_parts_by_segments(q, k, v, g, beta, level_weights, *, scale: float, top: int):
    seg = max(CHUNK, SEGMENT // CHUNK * CHUNK)
    T = q.shape[1]
    kw = dict(scale=scale, top=top)
    if T <= seg:
        return chunk_parts(q, k, v, g, beta, level_weights, **kw)
    pieces = []
    for a in range(0, T, seg):
        args = tuple(None if x is None else x[:, a:a + seg] for x in (q, k, v, g, beta, level_weights))
        if torch.is_grad_enabled():
            pieces.append(checkpoint(lambda *xs: chunk_parts(*xs, **kw), *args, use_reentrant=False))
        else:
            pieces.append(chunk_parts(*args, **kw))
    return tuple(None if p[0] is None else torch.cat(p, dim=1) for p in zip(*pieces))


def fused_by_levels(base, q, k, v, g, beta, level_weights, *, scale, run_init, position_offset: int, top: int,
                    want_runs: bool):
    """The log-linear op from its incoming run states (``run_init`` [B, H, >= top+1, K, V] or None, as
    chunk.loglinear_by_levels takes them) for a call starting on a chunk boundary (position_offset % C ==
    0). ``base``: the public base op (the final runs of the levels inside the last chunk). Returns (o
    fp32, final run states [B, H, top+1, K, V] fp32 or None)."""
    from .triton_levels import LevelRuns

    p0 = position_offset
    K = q.shape[-1]
    c = CHUNK.bit_length() - 1
    scale = float(K ** -0.5 if scale is None else scale)
    o, qt, w, ut, gam = _chunk_parts_by_segments(q, k, v, g, beta, level_weights, scale=scale, top=top)
    runs = []
    if want_runs:  # blocks of <= C tokens start inside this call: their runs come from the last block alone
        gates = (g,) if beta is None else (g, beta)
        runs = [s.float() for s in _last_block_states(base, k, v, gates, p0, range(min(c, top) + 1), "torch",
                                                       CHUNK)]
    if top > c:
        lw = level_weight_differences(q, level_weights, top)[..., c + 1:].float().contiguous()
        s0 = None if run_init is None else run_init[:, :, c + 1: top + 1].float().contiguous()
        o_inter, st = LevelRuns.apply(qt, k.contiguous(), w, ut, gam, lw, s0, scale, p0 // CHUNK, bool(want_runs))
        o = o + o_inter
        if want_runs:
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
    return o.to(q.dtype), final
