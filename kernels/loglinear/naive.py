"""Token-by-token log-linear recurrence: the ground truth of the log-linear ops.

The state is the set of per-level bucket states of the last query, S[l] ([B, H, L, K, V], K x V
layout as in the base ops): S[l] = sum over the sources of level l of their writes carried by the base
transitions up to that query. One step, at global position t:

    1. Fenwick merge (t >= 1): m = bit_length(t XOR (t-1)); S[m] <- S[0] + ... + S[m]; S[0..m-1] <- 0
    2. base transition on every level: S[l] <- A_t S[l]  (A_t = exp(g_t)(I - beta_t k_t k_t^T) or exp(g_t) I)
    3. write: S[0] <- write_t  (beta_t k_t v_t^T, or k_t v_t^T)
    4. o_t = scale * sum_l lambda[t, l] * S[l]^T q_t

O(L K V) per token. Autograd differentiates it.
"""
from __future__ import annotations

import torch

from ..naive import compute_dtype
from .levels import merge_level


def naive_loglinear(q, k, v, g, beta, level_weights, *, scale=None, initial_state=None,
                    output_final_state=False, position_offset=0):
    """beta=None means the Mamba-2 form (no erase, unit write). Returns (o in q.dtype, final level
    states [B, H, L, K, V] or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    L = level_weights.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v, g, beta, level_weights, initial_state)
    qf, kf, vf, lam = q.to(dt), k.to(dt), v.to(dt), level_weights.to(dt)
    S = q.new_zeros(B, H, L, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    for i in range(T):
        t = position_offset + i
        if t >= 1:
            m = merge_level(t)
            merged = S[:, :, : m + 1].sum(dim=2, keepdim=True)
            S = torch.cat([torch.zeros_like(S[:, :, :m]), merged, S[:, :, m + 1:]], dim=2)
        kt, vt = kf[:, i], vf[:, i]                                  # [B, H, K], [B, H, V]
        if beta is not None:
            b = beta[:, i].to(dt)[..., None, None]                    # [B, H, 1, 1]
            kS = torch.einsum("bhk,bhlkv->bhlv", kt, S)
            S = S - b[..., None] * kt[:, :, None, :, None] * kS[..., None, :]
            write = b * kt[..., :, None] * vt[..., None, :]
        else:
            write = kt[..., :, None] * vt[..., None, :]
        S = S * torch.exp(g[:, i].to(dt))[..., None, None, None]
        S = torch.cat([S[:, :, :1] + write[:, :, None], S[:, :, 1:]], dim=2)
        outs.append(scale * torch.einsum("bhlkv,bhk,bhl->bhv", S, qf[:, i], lam[:, i]))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V, dtype=dt)
    return o.to(q.dtype), (S if output_final_state else None)
