"""The inter-chunk levels of log-linear Mamba-2 (scalar decay) without level scans: Fenwick block totals.

With a scalar decay the chunk increment dS_n = K_n^T diag(exp(gl_n - gam)) V_n (chunk n's writes carried
to its end) does not depend on the state, so the level states need no sequential scan per level (as the
delta rule's do, ``triton_levels``). Block totals form a tree over the chunks,

    T_0 = dS,   T_{j+1}[i] = exp(D_j[2i+1]) T_j[2i] + T_j[2i+1],   D_{j+1}[i] = D_j[2i] + D_j[2i+1]

(D_j: the total log-decay of a block of 2^j chunks), and chunk n's sources in earlier chunks of the
same top block split into the buckets m with bit m of n set: the block (n >> m) - 1 of 2^m chunks, at
level c + 1 + m. With the weights of the runs telescoping (sum_{l >= m} (lambda_l - lambda_{l+1}) =
lambda_m) the readout is

    o_t += scale * lambda[t, c + 1 + m] * exp(G_t) q_t^T T_m[(n >> m) - 1]      (bit m of n set)

where G_t is the log-decay from the end of the bucket (the start of the odd half-block of 2^m chunks
holding t) to t, inclusive. Per m it is ONE batched matmul over the odd half-blocks (a view, no
gather): every bucket state serves the 2^m chunks after it. No subtraction of states, so no
cancellation. Work: the increments (one chunk-sized matmul per chunk), ~NC tree states, and per level
a [T/2, K] x [K, V] readout, all parallel; torch autograd takes the backward (the same tree
transposed). Needs the call to start at position 0 with no incoming state (fused.py routes only those
here) and pads the sequence with zero tokens (g = 0) to 2^NL chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..triton.common import CHUNK


def _heads_first(x: torch.Tensor, Tp: int) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, Tp, ...], zero-padded at the end of the time axis."""
    x = x.movedim(1, 2)
    pad = [0, 0] * (x.dim() - 3) + [0, Tp - x.shape[2]]
    return F.pad(x, pad).contiguous()


def tree_levels(q, k, v, g, lam, scale: float, NL: int, want_final: bool):
    """The levels c+1 .. c+NL of log-linear Mamba-2 (c = log2 CHUNK) for a call from position 0 with no
    incoming state. q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] fp32 (log-decay), lam [B, T, H, >=
    c+1+NL] fp32 (the full level weights). Returns (o_inter [B, T, H, V] fp32, the final run states of the
    levels [B, H, NL, K, V] fp32 or None), differentiable by torch autograd."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, c = CHUNK, CHUNK.bit_length() - 1
    P = 1 << NL
    if P * C < T:
        raise ValueError(f"tree_levels: {NL} levels above the chunk cover {P * C} < T={T} tokens")
    Tp = P * C
    qh, kh, vh = (_heads_first(x, Tp) for x in (q, k, v))
    gh = _heads_first(g.float(), Tp)                                   # [B, H, Tp]
    lh = _heads_first(lam[..., c + 1: c + 1 + NL].float(), Tp)          # [B, H, Tp, NL]
    gam = gh.view(B, H, P, C).cumsum(-1)
    gl = gam[..., -1]                                                  # [B, H, P]
    kd = kh.view(B, H, P, C, K).float() * torch.exp(gl[..., None] - gam)[..., None]
    totals = [kd.transpose(-1, -2) @ vh.view(B, H, P, C, V).float()]  # T_0 = dS [B, H, P, K, V]
    decays = [gl]
    for _ in range(NL):
        t2 = totals[-1].view(B, H, -1, 2, K, V)
        d2 = decays[-1].view(B, H, -1, 2)
        totals.append(t2[:, :, :, 0] * torch.exp(d2[:, :, :, 1])[..., None, None] + t2[:, :, :, 1])
        decays.append(d2.sum(-1))
    o = torch.zeros(B, H, Tp, V, device=q.device, dtype=torch.float32)
    for m in range(NL):
        A, half = P >> (m + 1), (C << m)
        qs = qh.view(B, H, A, 2, half, K)[:, :, :, 1]
        gs = gh.view(B, H, A, 2, half)[:, :, :, 1].cumsum(-1)
        bucket = totals[m].view(B, H, A, 2, K, V)[:, :, :, 0]
        # the row factors (decay from the bucket's end, level weight, scale) go on the product's rows
        f = torch.exp(gs) * lh.view(B, H, A, 2, half, NL)[:, :, :, 1, :, m] * scale
        o.view(B, H, A, 2, half, V)[:, :, :, 1].addcmul_(qs @ bucket.to(q.dtype), f[..., None])
    final = None
    if want_final:
        NT = -(-T // C)
        runs = []
        for j in range(NL):
            b = ((NT - 1) >> (j + 1)) << (j + 1)
            if NT - b == 2 << j:  # the block is complete: its tree total
                runs.append(totals[j + 1][:, :, b >> (j + 1)])
                continue
            acc = torch.zeros(B, H, K, V, device=q.device, dtype=torch.float32)
            for m in range(j, -1, -1):  # its buckets, earliest first
                if (NT >> m) & 1:
                    i = (NT >> m) - 1
                    acc = acc * torch.exp(decays[m][:, :, i])[..., None, None] + totals[m][:, :, i]
            runs.append(acc)
        final = torch.stack(runs, dim=2)
    return o[:, :, :T].movedim(1, 2), final
