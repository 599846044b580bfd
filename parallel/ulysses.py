"""Ulysses attention over the CP group: all-to-all from sequence shards to head shards and back
(docs/design.md §4).

Each rank holds q/k/v ``[B, T_local, H, D]`` of its contiguous shard. DeepSpeed's
``DistributedAttention`` all-to-alls them to ``[B, T_full, H/P, D]`` (every rank: the whole sequence
for H/P heads), runs ``attn_fn`` there, and all-to-alls the result back to ``[B, T_local, H, D]``.
Its backward is the reverse all-to-all, so gradients are exact. DeepSpeed is imported lazily (it is
heavy); without CUDA, ``DS_ACCELERATOR=cpu`` is set before the import so that it runs on gloo.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist


def get_accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def _distributed_attention_class():
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed.comm as ds_comm
    from deepspeed.sequence.layer import DistributedAttention
    if not ds_comm.is_initialized():
        if get_accelerator_name() == "cpu":
            # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce extension (a minute
            # on first use) that Ulysses never calls: it only needs all_to_all_single.
            import deepspeed.ops
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # wraps the torch.distributed world that already exists; initialises nothing new
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    return DistributedAttention


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group,
                      attn_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``attn_fn`` over the full sequence, heads split over the CP ``group``; identity wrapper (plain
    ``attn_fn(q, k, v)``) when ``group`` is None or of size 1.

    q, k, v: ``[B, T_local, H, D]`` (k/v may have fewer heads, GQA); ``attn_fn`` receives
    ``[B, T_full, H/P, D]`` tensors (token order = global order) and returns ``[B, T_full, H/P, Dv]``.
    Needs the number of heads (of q and of k/v) divisible by the group size."""
    if group is None or dist.get_world_size(group) == 1:
        return attn_fn(q, k, v)
    P = dist.get_world_size(group)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"ulysses_attention: {name} must be [B, T_local, H, D], got shape {tuple(x.shape)}")
        if x.shape[2] % P:
            raise ValueError(f"ulysses_attention: {name} has {x.shape[2]} heads, not divisible by the CP size {P}; "
                             f"make model.attn_heads (per TP rank) a multiple of parallel.cp={P}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(f"ulysses_attention: q, k, v must share [B, T_local]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    layer = _distributed_attention_class()(attn_fn, group, scatter_idx=2, gather_idx=1)
    return layer(q, k, v, 0)
