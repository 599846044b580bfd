"""Token-by-token recurrences: the ground truth every faster implementation is tested against
(docs/design.md §2).

One generic recurrence covers the three mixers (state S is [B, H, K, V], K x V layout):

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + w_t k_t v_t^T,   o_t = scale * S_t^T q_t

- delta rule:        a_t = 1,         erase b_t = beta_t, write w_t = beta_t
- gated delta rule:  a_t = exp(g_t),  erase b_t = beta_t, write w_t = beta_t
- gated linear attn: a_t = exp(g_t),  no erase,           write w_t = 1

Everything runs in plain torch ops, so autograd differentiates it (initial_state included).
The state is accumulated in float32 (float64 when the inputs are float64, which tests use).
"""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (states are never kept in half precision)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _per_token(x: torch.Tensor | None, t: int, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x[:, t].to(dtype)[..., None, None]  # [B, H, 1, 1]


def naive_recurrence(q, k, v, *, g=None, beta=None, scale=None, initial_state=None,
                     output_final_state=False):
    """Generic recurrence; g=None means no decay, beta=None means no erase and unit write."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    if initial_state is None:
        S = q.new_zeros(B, H, K, V, dtype=dt)
    else:
        S = initial_state.to(dt)
    outs = []
    for t in range(T):
        kt = kf[:, t]                       # [B, H, K]
        vt = vf[:, t]                       # [B, H, V]
        a = _per_token(g, t, dt)
        if a is not None:
            S = S * torch.exp(a)
        if beta is None:
            S = S + kt[..., :, None] * vt[..., None, :]
        else:
            b = beta[:, t].to(dt)[..., None]  # [B, H, 1]
            kS = torch.einsum("bhk,bhkv->bhv", kt, S)
            S = S + kt[..., :, None] * (b * (vt - kS))[..., None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, qf[:, t]))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V, dtype=dt)
    return o.to(q.dtype), (S if output_final_state else None)


def naive_shard_transition(k, v, *, g=None, beta=None):
    """(A, Bst) of one shard by the definition: A = M_T ... M_1, Bst = final state from zero.

    Returns A as [B, H, K, K], or [B, H] (the scalar decay) when beta is None (gla).
    """
    B, T, H, K = k.shape
    dt = compute_dtype(k, v, g, beta)
    if beta is None:
        logA = torch.zeros(B, H, dtype=dt, device=k.device)
        if g is not None:
            logA = g.to(dt).sum(dim=1)
        A = torch.exp(logA)
    else:
        kf = k.to(dt)
        A = torch.eye(K, dtype=dt, device=k.device).expand(B, H, K, K).clone()
        for t in range(T):
            kt = kf[:, t]
            b = beta[:, t].to(dt)[..., None, None]
            A = A - b * kt[..., :, None] * torch.einsum("bhk,bhkj->bhj", kt, A)[..., None, :]
            if g is not None:
                A = A * torch.exp(g[:, t].to(dt))[..., None, None]
    q_dummy = k.new_zeros(k.shape)
    _, Bst = naive_recurrence(q_dummy, k, v, g=g, beta=beta, output_final_state=True)
    return A, Bst


def naive_shard_state_grad(q, k, do, *, g=None, beta=None, scale=None):
    """G = d sum(o * do) / d S_0 = sum_t scale (M_t ... M_1)^T q_t do_t^T, by a reverse token scan.

    M_t = a_t (I - b_t k_t k_t^T) is symmetric, so M_t^T = M_t.
    """
    B, T, H, K = q.shape
    V = do.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, do, g, beta)
    qf, kf, dof = q.to(dt), k.to(dt), do.to(dt)
    G = q.new_zeros(B, H, K, V, dtype=dt)
    for t in reversed(range(T)):
        G = G + scale * qf[:, t][..., :, None] * dof[:, t][..., None, :]
        if beta is not None:
            kt = kf[:, t]
            b = beta[:, t].to(dt)[..., None]
            kG = torch.einsum("bhk,bhkv->bhv", kt, G)
            G = G - kt[..., :, None] * (b * kG)[..., None, :]
        if g is not None:
            G = G * torch.exp(g[:, t].to(dt))[..., None, None]
    return G
