"""ReRoPE and Leaky ReRoPE for global attention at eval time.

RoPE makes the score of query i and key j a function of the relative position r = i - j. ReRoPE keeps
r exact inside a window w and clips it beyond: r' = min(r, w); Leaky ReRoPE lets it grow slowly
instead, r' = w + (r - w) / k for r >= w (leak 1/k; k = inf is ReRoPE). Every distance the model sees
then stays within (or close to) those it trained on, at the cost of a second score per pair.

Two passes: inside the window the usual rotation (q at i, k at j); outside it q is rotated at
i / k + w (1 - 1/k) and k at j / k, whose difference is exactly w + (i - j - w) / k (ReRoPE: q at w,
k at 0). The two score matrices are merged by the window mask before one softmax. Queries go in
blocks, so memory is O(block x T), not O(T^2).
"""
from __future__ import annotations

import math

import torch

from .rope import RotaryEmbedding

QUERY_BLOCK = 1024


def rerope_attention(q, k, v, rope: RotaryEmbedding, window: int, leak: float, q_pos: torch.Tensor,
                     k_pos: torch.Tensor, q_docs: torch.Tensor | None = None, k_docs: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """Causal attention with (Leaky) ReRoPE relative positions. q [B, Tq, H, D], k/v [B, Tk, H, *]
    UNROTATED, at integer positions q_pos [Tq], k_pos [Tk]; keys with k_pos > q_pos (or, with document
    ids [B, T*], of another document) are masked. leak = 1/k (0 = ReRoPE). Returns [B, Tq, H, Dv]."""
    if window < 1:
        raise ValueError(f"ReRoPE window must be >= 1, got {window}")
    if not 0.0 <= leak < 1.0:
        raise ValueError(f"ReRoPE leak (1/k) must lie in [0, 1), got {leak}")
    from .attention import expand_kv

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
    k_in = rope(k, k_pos).transpose(1, 2).float()
    k_out = rope(k, k_pos.double() * leak).transpose(1, 2).float()
    vt = v.transpose(1, 2).float()
    outs = []
    for a in range(0, q.shape[1], QUERY_BLOCK):
        qb, pb = q[:, a:a + QUERY_BLOCK], q_pos[a:a + QUERY_BLOCK]
        q_in = rope(qb, pb).transpose(1, 2).float()
        q_out = rope(qb, pb.double() * leak + window * (1.0 - leak)).transpose(1, 2).float()
        rel = pb[:, None] - k_pos[None, :]
        scores = torch.where(rel < window, q_in @ k_in.transpose(-1, -2), q_out @ k_out.transpose(-1, -2)) * scale
        allowed = (rel >= 0)[None, None]
        if q_docs is not None:
            allowed = allowed & (q_docs[:, a:a + QUERY_BLOCK, None] == k_docs[:, None, :])[:, None]
        scores = scores.masked_fill(~allowed, -math.inf)
        outs.append(torch.softmax(scores, dim=-1) @ vt)
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
