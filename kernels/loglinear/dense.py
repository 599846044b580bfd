"""Dense masked form of the log-linear ops (tests only: O(T^2) memory).

    o = scale * [(Lambda * Aeff) V  +  prefix terms],   Lambda[t, s] = lambda[t, level(t, s)]

Aeff[t, s] = q_t^T (A_t ... A_{s+1}) w_s k_s is the base mixer's attention matrix (w_s = beta_s for
Gated DeltaNet, 1 for Mamba-2), built here by carrying every w_s k_s forward through the transitions.
An initial state holds the level states of query p0-1 (p0 = position_offset); its level l' reaches
query t at level max(bit_length(t XOR (p0-1)), l'), through the propagator A_t ... A_{p0}.
It shares no code with the naive recurrence or the chunked form, so the three check each other.
"""
from __future__ import annotations

import torch

from ..naive import compute_dtype
from .levels import bit_length, level_matrix


def _transition(x: torch.Tensor, k_t, a_t, b_t) -> torch.Tensor:
    """A_t x for a batch of K-vectors x [B, H, N, K] (A_t is symmetric)."""
    if b_t is not None:
        x = x - b_t[..., None, None] * k_t[:, :, None, :] * (x @ k_t[..., None])
    return a_t[..., None, None] * x


def dense_loglinear(q, k, v, g, beta, level_weights, *, scale=None, initial_state=None,
                    output_final_state=False, position_offset=0):
    B, T, H, K = q.shape
    L = level_weights.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v, g, beta, level_weights, initial_state)
    qf, kf, vf = (x.to(dt).transpose(1, 2) for x in (q, k, v))       # [B, H, T, *]
    lam = level_weights.to(dt).transpose(1, 2)                          # [B, H, T, L]
    a = torch.exp(g.to(dt)).transpose(1, 2)                             # [B, H, T]
    b = None if beta is None else beta.to(dt).transpose(1, 2)
    w = kf if b is None else b[..., None] * kf                          # write keys w_s k_s
    carried = torch.zeros_like(kf)          # row s: w_s k_s carried to the current step (0 if s > t)
    prop = torch.eye(K, dtype=dt, device=q.device).expand(B, H, K, K)  # = (A_t ... A_{p0})^T
    rows, qeff = [], []
    idx = torch.arange(T, device=q.device)
    for t in range(T):
        carried = _transition(carried, kf[:, :, t], a[:, :, t], None if b is None else b[:, :, t])
        carried = carried + (idx == t).to(dt)[:, None] * w[:, :, t, None, :]
        prop = _transition(prop, kf[:, :, t], a[:, :, t], None if b is None else b[:, :, t])
        rows.append(carried @ qf[:, :, t, :, None])                     # [B, H, T, 1]
        qeff.append(prop @ qf[:, :, t, :, None])                        # [B, H, K, 1]
    aeff = torch.cat(rows, dim=-1).transpose(-1, -2)                    # [B, H, T(t), T(s)]
    pos = position_offset + idx
    lv = level_matrix(pos, pos)                                          # [T, T], -1 above the diagonal
    lam_ts = torch.gather(lam, -1, lv.clamp_min(0).expand(B, H, T, T))   # lambda[t, level(t, s)]
    o = (lam_ts * aeff * (lv >= 0)) @ vf
    final = None
    if initial_state is not None or output_final_state:
        h = bit_length(pos ^ (position_offset - 1)) if position_offset >= 1 else None
    if initial_state is not None:
        S0 = initial_state.to(dt)                                        # [B, H, L, K, V]
        qe = torch.cat(qeff, dim=-1).transpose(-1, -2)                   # [B, H, T, K]
        prefix = torch.einsum("bhtk,bhlkv->bhtlv", qe, S0)               # (P^T q_t) . S0[l]
        lev = torch.maximum(h[:, None], torch.arange(L, device=q.device)[None, :])  # [T, L]
        lam_pre = torch.gather(lam, -1, lev.clamp_max(L - 1).expand(B, H, T, L)) * (lev < L)
        o = o + (lam_pre[..., None] * prefix).sum(dim=3)
    o = scale * o
    if output_final_state:
        e = position_offset + T - 1
        lv_e = bit_length(e ^ pos)                                        # level(e, s) for each s
        onehot = (lv_e[None, :] == torch.arange(L, device=q.device)[:, None]).to(dt)   # [L, T]
        final = torch.einsum("ls,bhsk,bhsv->bhlkv", onehot, carried, vf)
        if initial_state is not None:
            lev_e = torch.maximum(h[-1], torch.arange(L, device=q.device))            # [L] (source l')
            move = (lev_e[None, :] == torch.arange(L, device=q.device)[:, None]).to(dt)  # [L(new), L(old)]
            carried_S0 = torch.einsum("bhji,bhljv->bhliv", prop, S0)  # P(e, p0-1) S0[l]
            final = final + torch.einsum("nl,bhlkv->bhnkv", move, carried_S0)
    return o.transpose(1, 2).to(q.dtype), final
