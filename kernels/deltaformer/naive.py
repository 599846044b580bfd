"""Deltaformer, token by token: the ground truth of the faster u-pass implementations.

    u_t = v_t - beta_t * sum_{j<t} softmax_j(scale * k_t . k_j) u_j      (u_0 = v_0)
    o_t = sum_{j<=t} softmax_j(scale * q_t . k_j) u_j

The softmax of u_t runs over the earlier keys j < t only (strictly causal); that of o_t over j <= t.
Everything is plain torch, so autograd differentiates it. Computed in float32 (float64 if an input is).
"""
from __future__ import annotations

import torch

from ..naive import compute_dtype


def naive_u_pass(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, scale: float,
                 prefix_k: torch.Tensor | None = None, prefix_u: torch.Tensor | None = None) -> torch.Tensor:
    """u [B, T, H, V] in the compute dtype (float32/float64) from k [B, T, H, K], v [B, T, H, V],
    beta [B, T, H]. ``prefix_k`` / ``prefix_u`` [B, n, H, *]: keys and u of n tokens before these
    (decoding continues a cached sequence this way)."""
    dt = compute_dtype(k, v, beta)
    kf, vf, bf = k.to(dt), v.to(dt), beta.to(dt)
    n0 = 0 if prefix_k is None else prefix_k.shape[1]
    k_all = kf if prefix_k is None else torch.cat([prefix_k.to(dt), kf], dim=1)
    us = [] if prefix_u is None else list(prefix_u.to(dt).unbind(1))
    for t in range(k.shape[1]):
        if n0 + t == 0:
            us.append(vf[:, 0])
            continue
        prev_u = torch.stack(us, dim=1)                                   # [B, n0 + t, H, V]
        p = torch.softmax(scale * torch.einsum("bhk,bjhk->bhj", kf[:, t], k_all[:, : n0 + t]), dim=-1)
        w = torch.einsum("bhj,bjhv->bhv", p, prev_u)
        us.append(vf[:, t] - bf[:, t, :, None] * w)
    return torch.stack(us[n0:], dim=1)


def naive_readout(q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """o_t = sum_{j<=t} softmax_j(scale q_t . k_j) u_j, one query at a time, in u's dtype."""
    dt = u.dtype
    qf, kf = q.to(dt), k.to(dt)
    outs = []
    for t in range(q.shape[1]):
        p = torch.softmax(scale * torch.einsum("bhk,bjhk->bhj", qf[:, t], kf[:, : t + 1]), dim=-1)
        outs.append(torch.einsum("bhj,bjhv->bhv", p, u[:, : t + 1]))
    return torch.stack(outs, dim=1)


def naive_deltaformer(q, k, v, beta, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V] in q.dtype, u [B, T, H, V] in v.dtype)."""
    u = naive_u_pass(k, v, beta, scale)
    return naive_readout(q, k, u, scale).to(q.dtype), u.to(v.dtype)
