"""Deltaformer's read-out: o_t = sum_{j<=t} softmax_j(scale q_t . k_j) u_j, causal softmax attention
with u as the values. SDPA (flash / memory-efficient kernels on CUDA); no flash-attn package."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_readout(q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [B, T, H, K], u [B, T, H, V] (cast to q.dtype) -> o [B, T, H, V] in q.dtype."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), u.to(q.dtype).transpose(1, 2),
                                       is_causal=True, scale=scale)
    return o.transpose(1, 2)


def prefix_readout(q: torch.Tensor, k_all: torch.Tensor, u_all: torch.Tensor, scale: float,
                   q_docs: torch.Tensor | None = None, k_docs: torch.Tensor | None = None) -> torch.Tensor:
    """The read-out of the LAST Tq positions of a sequence whose keys / u are k_all, u_all
    [B, Tk, H, *] (Tk >= Tq): query i sits at position Tk - Tq + i and sees keys j <= that position
    (and, given document ids q_docs [B, Tq] / k_docs [B, Tk], only keys of its own document).
    Used by decoding (cached keys) and by context parallelism (the earlier ranks' keys). Without
    documents the mask is SDPA's lower-right causal bias (no mask tensor; the flash / efficient
    kernels on CUDA); with documents it is a dense [Tq, Tk] mask."""
    Tq, Tk = q.shape[1], k_all.shape[1]
    if q_docs is None:
        # imported here: torch.nn.attention.bias imports torch._dynamo (~1.5 s), which every process that
        # validates a config (the cp/tp launcher, `config show`) used to pay through lctrain.models
        from torch.nn.attention.bias import causal_lower_right

        o = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.to(q.dtype).transpose(1, 2),
                                           u_all.to(q.dtype).transpose(1, 2), attn_mask=causal_lower_right(Tq, Tk),
                                           scale=scale)
        return o.transpose(1, 2)
    qpos = torch.arange(Tk - Tq, Tk, device=q.device)
    mask = torch.arange(Tk, device=q.device)[None, :] <= qpos[:, None]
    if q_docs is not None:
        mask = (mask[None] & (q_docs[:, :, None] == k_docs[:, None, :]))[:, None]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.to(q.dtype).transpose(1, 2),
                                       u_all.to(q.dtype).transpose(1, 2), attn_mask=mask, scale=scale)
    return o.transpose(1, 2)
