"""Log-linear ops as a sum of base-op runs, one per level (backends "torch" and "triton").

Because level(t, s) <= l exactly when s and t share the aligned block of 2^l positions, let R_l be the
base op (gated_delta_rule / gated_linear_attn) run with its state reset at every multiple of 2^l:
R_l(q)_t sums the sources of levels 0..l. With lambda[t, top+1] := 0,

    o = sum_{l=0..top} R_l(q * (lambda[:, l] - lambda[:, l+1]))

telescopes to sum_s lambda[t, level(t, s)] (write_s carried to t) q_t: the definition. Each R_l is one
call of the base op on the sequence cut into whole blocks of 2^l tokens (a reshape to a larger batch),
plus at most two ragged pieces at the ends (no padding: the base op handles ragged chunks). Only the
first block can carry an incoming state; the chunk size of a level is min(chunk_size, 2^l).

Run states. The state of R_l at a position is the sum of the level states 0..l there when the block
continues; so the per-level ("slot") states of the public API and the run states convert by a cumsum
over levels (in) and a difference (out), see ``runs_from_slots`` / ``slots_from_runs``.

Levels above top = bit_length(p0 + T - 1) all see one block holding the whole sequence: R_top covers
them, so they cost nothing (they get a zero gradient: no query uses them). (An initial state has nothing
above level bit_length(p0 - 1) <= top: ops.py drops such slots.)

Levels 0..c (c = log2 chunk_size) never leave an aligned chunk: they take one intra-chunk pass instead
(``intra_chunk_levels``: the base mixer's chunk attention masked by the level weights). The cost is then
one intra pass plus (top - c) base-op runs over T tokens, i.e. O(T log(T / C)) work, a factor
~log2(T / C) over the base op. Backend "triton" (fused.py) shares the WY transform and the intra-chunk
work across the levels and runs only the levels' chunk scans per level.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..chunk import _ChunkTerms, _to_chunks
from ..naive import compute_dtype
from .levels import level_matrix


def runs_from_slots(slots: torch.Tensor, position_offset: int) -> torch.Tensor:
    """Incoming run states [B, H, L, K, V] from the level states of query p0-1 (p0 = position_offset):
    run l continues into this call iff p0 is not a multiple of 2^l, and then holds slots 0..l."""
    # (a mask formed on the device: one built from a host list would wait for the GPU, one zeroing a level at a
    # time was 16 launches)
    fresh = position_offset % torch.pow(2, torch.arange(slots.shape[2], device=slots.device)) == 0
    return slots.cumsum(dim=2).masked_fill_(fresh[:, None, None], 0.0)


def slots_from_runs(runs: torch.Tensor, L: int) -> torch.Tensor:
    """Level states [B, H, L, K, V] of the last query from the final run states of levels 0..top."""
    slots = torch.cat([runs[:, :, :1], runs[:, :, 1:] - runs[:, :, :-1]], dim=2)
    if slots.shape[2] < L:
        pad = slots.new_zeros(*slots.shape[:2], L - slots.shape[2], *slots.shape[3:])
        slots = torch.cat([slots, pad], dim=2)
    return slots


def weight_differences(lam) -> torch.Tensor:
    """w_l = lam_l - lam_{l+1} along the last axis, the last one lam itself (the run weights of level weights)."""
    return torch.cat([lam[..., :-1] - lam[..., 1:], lam[..., -1:]], dim=-1)


def add_weight_differences_grad(dlam, dw, levels=None):
    """dlam += the gradient through ``weight_differences``: w_j = lam_j - lam_{j+1} (the last lam itself), so lam_j
    takes dw_j - dw_{j-1}. dw [..., n] holds the gradients of the levels ``levels`` (its column i is level
    levels[i]'s), by default of every level of dlam in order. In place; returns dlam."""
    if levels is None:
        dlam += dw
        dlam[..., 1:] -= dw[..., :-1]
        return dlam
    for i, j in enumerate(levels):
        dlam[..., j] += dw[..., i]
        if j + 1 < dlam.shape[-1]:
            dlam[..., j + 1] -= dw[..., i]
    return dlam


def level_weight_differences(q, level_weights, top: int) -> torch.Tensor:
    """w_l = lambda_l - lambda_{l+1} for l < top, w_top = lambda_top: [B, T, H, top+1] (float32/64)."""
    return weight_differences(level_weights[..., : top + 1].to(compute_dtype(q, level_weights)))


def level_query(q, w, lev: int) -> torch.Tensor:
    """The queries of run R_lev: q * w_lev, in q's dtype (what the base op takes)."""
    return (q.to(w.dtype) * w[..., lev, None]).to(q.dtype)


def level_run(base, q, k, v, gates, init, start: int, block: int, backend: str, chunk_size: int, scale=None):
    """The base op with its state reset at every multiple of ``block`` of the global position; the tokens
    sit at start .. start+T-1; ``init`` (or None) enters the first token when ``start`` is inside a block.
    Returns (o [B, T, H, V] in q.dtype, the state at the end of the last block)."""
    B, T, H = q.shape[:3]
    cs = min(chunk_size, block)
    if backend != "torch" and cs < chunk_size:
        backend = "torch"  # blocks shorter than a Triton chunk: the torch base op (cheap, see docs)

    def run(xs, s0):
        # so are runs of one chunk or less (the level-6 final state, the last partial block of a level): the
        # Triton kernels compile a constant chunk count of 1 as its own specialisation, which faulted on an
        # H200 (issue 18, docs/loglinear.md); at most a chunk per row, so the torch op costs next to nothing
        which = "torch" if xs[0].shape[1] <= cs else backend
        return base(*xs, scale=scale, initial_state=s0, output_final_state=True, backend=which, chunk_size=cs)

    xs = (q, k, v) + tuple(gates)
    outs, state, lo = [], None, 0
    f = start % block
    if f:
        lo = min(block - f, T)
        o, state = run(tuple(x[:, :lo] for x in xs), init)
        outs.append(o)
    nb = (T - lo) // block
    if nb:
        hi = lo + nb * block
        blocks = tuple(x[:, lo:hi].reshape(B * nb, block, *x.shape[2:]) for x in xs)
        o, st = run(blocks, None)
        outs.append(o.reshape(B, nb * block, *o.shape[2:]))
        state = st.reshape(B, nb, *st.shape[1:])[:, -1]
        lo = hi
    if lo < T:
        o, state = run(tuple(x[:, lo:] for x in xs), None)
        outs.append(o)
    return torch.cat(outs, dim=1), state


# Level runs keep their scaled queries and the base op's saved tensors for the backward, about
# B*T*H*(K*itemsize + 4*chunk) bytes each. When all of them would exceed this fraction of the GPU's memory
# (e.g. 1M tokens, 16 heads of 128 on one H200), every run recomputes its forward in the backward instead
# (torch.utils.checkpoint: ~1/3 more time, memory of one run). ``RECOMPUTE_LEVELS`` True/False forces it.
RECOMPUTE_FRACTION = 0.25
RECOMPUTE_LEVELS: bool | None = None
# The intra-chunk pass runs over pieces of this many tokens (each recomputed in the backward), so its
# float32 temporaries stay a few GiB however long the sequence.
INTRA_SEGMENT = 32768


def _recompute_levels(q: torch.Tensor, n_levels: int, chunk_size: int) -> bool:
    if RECOMPUTE_LEVELS is not None:
        return RECOMPUTE_LEVELS
    if q.device.type != "cuda" or n_levels <= 0:
        return False
    B, T, H, K = q.shape
    saved = n_levels * B * T * H * (K * q.element_size() + 4 * chunk_size)
    return saved > RECOMPUTE_FRACTION * torch.cuda.get_device_properties(q.device).total_memory


def intra_chunk_levels(q, k, v, g, beta, level_weights, *, scale, chunk_size: int, top: int) -> torch.Tensor:
    """sum_{l <= c} R_l(q * w_l) in one pass (c = log2(chunk_size), chunks aligned to the positions):
    those levels never leave a chunk, so they are the base mixer's intra-chunk attention matrix
    Aeff[t, s] = q_t^T (A_t ... A_{s+1}) w_s k_s (decay * Q K^T, times the WY transform for the delta rule)
    masked with lambda[t, level(t, s)] - lambda[t, c+1] (the levels above c come from the runs).
    Returns float32/64 [B, T, H, V]."""
    B, T, H, K = q.shape
    C = chunk_size
    c = C.bit_length() - 1
    hi = min(c, top)
    dt = compute_dtype(q, k, v, g, beta, level_weights)
    scale = K ** -0.5 if scale is None else scale
    lam = level_weights[..., : hi + 1].to(dt)
    if top > c:
        lam = lam - level_weights[..., c + 1: c + 2].to(dt)
    terms = _ChunkTerms(k, None, g, beta, C, dt, q=q, keep_transform=True)
    aeff = terms.decay * (terms.Q @ terms.K.transpose(-1, -2))             # [B, H, N, C, C]
    if terms.Tm is not None:
        aeff = aeff @ terms.Tm
    idx = torch.arange(C, device=q.device)
    lv = level_matrix(idx, idx)                                             # level inside an aligned chunk
    lamc = _to_chunks(lam, C, dt)                                           # [B, H, N, C, hi+1]
    mask = torch.gather(lamc, -1, lv.clamp(0, hi).expand(*lamc.shape[:3], C, C)) * (lv >= 0)
    O = scale * ((mask * aeff) @ _to_chunks(v, C, dt))
    return O.movedim(1, 3).reshape(B, -1, H, v.shape[-1])[:, :T]


def _last_block_states(base, k, v, gates, position_offset: int, levels, chunk_size: int, backend: str = "torch"):
    """Final run states of the given low levels (blocks inside the last chunk, starting at or after
    position_offset): the base op from zero over the last block of each, all in ONE call of the base op on
    ``backend`` (a run per level was ~7 calls of many small kernels: host time a GPU then waits on; the fused path
    takes the Triton one, fewer launches still). Each level's block is a
    suffix of the last n tokens, the levels side by side in the batch, the tokens before its block blanked
    (k = v = 0, g = 0 and beta = 0: the identity step, nothing written)."""
    levels = list(levels)
    if not levels:
        return []
    B, T = k.shape[:2]
    e = position_offset + T - 1
    starts = [e - (e % (1 << lev)) - position_offset for lev in levels]
    n = T - min(starts)
    keep = k.new_ones(len(levels), 1, n, dtype=torch.float32)
    for i, lo in enumerate(starts):
        keep[i, :, : lo - (T - n)] = 0
    xs = []
    for x in (k, v) + tuple(gates):
        tail = x[:, T - n:]
        mask = keep.view(len(levels), 1, n, *([1] * (x.dim() - 2))).to(x.dtype)   # (0 and 1: exact in any dtype)
        xs.append((tail[None] * mask).reshape(len(levels) * B, n, *x.shape[2:]))
    _, s = base(xs[0], xs[0], xs[1], *xs[2:], initial_state=None, output_final_state=True, backend=backend,
                chunk_size=chunk_size)
    return list(s.view(len(levels), B, *s.shape[1:]).unbind(0))


def loglinear_by_levels(base, q, k, v, gates, level_weights, *, scale, run_init, position_offset: int,
                        top: int, backend: str, chunk_size: int):
    """o = sum_l R_l(q * w_l) for l = 0..top and the final run states [B, H, top+1, K, V].

    ``run_init``: incoming run states [B, H, >= top+1, K, V] or None (all zero). ``base`` is the public
    base op (``gated_delta_rule`` or ``gated_linear_attn``) taking (q, k, v, *gates).
    When chunk_size is a power of two and position_offset a multiple of it, levels 0..log2(chunk_size)
    take one intra-chunk pass (``intra_chunk_levels``, recomputed in the backward) instead of one run each;
    their incoming run states are then unused (every such block starts inside this call)."""
    C = chunk_size
    o, finals, first = None, [], 0
    if C & (C - 1) == 0 and position_offset % C == 0:
        g, beta = gates[0], (gates[1] if len(gates) > 1 else None)
        kw = dict(scale=scale, chunk_size=C, top=top)
        seg = max(C, INTRA_SEGMENT // C * C)  # chunks are independent here: bound the pass's memory
        parts = []
        for a in range(0, q.shape[1], seg):
            args = tuple(None if x is None else x[:, a:a + seg] for x in (q, k, v, g, beta, level_weights))
            if torch.is_grad_enabled():
                parts.append(checkpoint(lambda *xs: intra_chunk_levels(*xs, **kw), *args, use_reentrant=False))
            else:
                parts.append(intra_chunk_levels(*args, **kw))
        o = torch.cat(parts, dim=1)
        first = min(C.bit_length() - 1, top) + 1
        finals = _last_block_states(base, k, v, gates, position_offset, range(first), chunk_size)
    w = level_weight_differences(q, level_weights, top)
    recompute = torch.is_grad_enabled() and _recompute_levels(q, top + 1 - first, chunk_size)

    def one_level(q, w, init, lev):
        return level_run(base, level_query(q, w, lev), k, v, gates, init, position_offset, 1 << lev, backend,
                         chunk_size, scale)

    for lev in range(first, top + 1):
        init = None if run_init is None else run_init[:, :, lev]
        if recompute:
            o_l, s_l = checkpoint(one_level, q, w, init, lev, use_reentrant=False)
        else:
            o_l, s_l = one_level(q, w, init, lev)
        o = o_l.to(w.dtype) if o is None else o + o_l.to(w.dtype)
        finals.append(s_l)
    return o.to(q.dtype), torch.stack(finals, dim=2)
