"""Deltaformer under context parallelism (CP rank r holds the contiguous tokens [r T, (r+1) T)).

The u-pass of a token reads the keys and u of EVERY earlier token, and u depends on all earlier u,
so a rank cannot start before the earlier ranks' u exist. Here each rank all-gathers k, v and beta
(one collective, float32; the backward sums the gradients of the gathered copies back onto their
owners), runs the u-pass over its whole prefix [0, (r+1) T) itself, and reads out its own queries
against that prefix (no Ulysses step: the rank already holds every key and u it needs).

What it costs: rank r does the u-pass of (r+1) T tokens, so the last rank does the single-process
u-pass of the whole sequence; CP spreads the read-out, the projections and the activations of the
other layers, but gives the u-pass no speed-up (the sequential dependency is the limit: a pipelined
pass that streams each rank's u to the later ranks as soon as it is solved would cut the critical
path to about 2 / P of it, not done). Memory: the gathered k, v, beta ([T, H, K + V + 1] float32)
plus the u-pass of the prefix, which keeps no T x T tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from lctrain.kernels.deltaformer.api import deltaformer_by_documents, deltaformer_u_by_documents
from lctrain.kernels.deltaformer.readout import prefix_readout

from .halo import _comm_device, gather_sequence


class _GatherSequence(torch.autograd.Function):
    """All ranks' x concatenated along dim 1; backward: the sum over ranks of the gradient of the
    gathered tensor, this rank's slice (reduce-scatter on NCCL, all-reduce + slice on gloo)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        comm = x.contiguous().to(_comm_device(x, group))
        parts = [torch.empty_like(comm) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, comm, group=group)
        return torch.cat(parts, dim=1).to(x.device)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        P, r = dist.get_world_size(group), dist.get_rank(group)
        comm = grad.contiguous().to(_comm_device(grad, group))
        T = comm.shape[1] // P
        if dist.get_backend(group) == "nccl":
            chunks = comm.unflatten(1, (P, T)).movedim(1, 0).contiguous()
            out = torch.empty_like(chunks[0])
            dist.reduce_scatter_tensor(out, chunks, group=group)
        else:
            dist.all_reduce(comm, group=group)
            out = comm[:, r * T:(r + 1) * T]
        return out.to(grad.device), None


def deltaformer_cp(q, k, v, beta, group, *, doc_ids=None, scale=None, backend="auto", chunk_size=64):
    """Deltaformer output [B, T_local, H, V] (q.dtype) of this rank's shard; q, k, v, beta are the
    local shards ([B, T_local, H, *], beta [B, T_local, H]); doc_ids [B, T_local] are GLOBAL document
    indices (or None). Every rank of ``group`` must call it. Differentiable in q, k, v, beta."""
    if group is None or dist.get_world_size(group) == 1:
        return deltaformer_by_documents(q, k, v, beta, doc_ids, scale=scale, backend=backend, chunk_size=chunk_size)
    r = dist.get_rank(group)
    B, Tl, H, K = k.shape
    V = v.shape[-1]
    dt = torch.float64 if torch.float64 in (k.dtype, v.dtype, beta.dtype) else torch.float32
    packed = torch.cat([k.to(dt), v.to(dt), beta.to(dt)[..., None]], dim=-1)
    prefix = _GatherSequence.apply(packed, group)[:, : (r + 1) * Tl]
    k_pre, v_pre, b_pre = prefix.split([K, V, 1], dim=-1)
    docs_pre = None
    if doc_ids is not None:
        docs_pre = gather_sequence(doc_ids, group, dim=1)[:, : (r + 1) * Tl]
    u_pre = deltaformer_u_by_documents(k_pre, v_pre, b_pre[..., 0], docs_pre, scale=scale, backend=backend,
                                       chunk_size=chunk_size)
    scale = K ** -0.5 if scale is None else scale
    return prefix_readout(q, k_pre.to(q.dtype), u_pre, scale, doc_ids, docs_pre)
