"""Gradient communication of the training step: parameter broadcast, gradient all-reduce, global
grad-norm clipping, and the mean of a metric over the replicas.

Gradient reduction (chosen over DDP, and documented here because the loss scaling depends on it):
each rank's loss is its share of its sequence's mean (see step.lm_loss), divided by grad_accum.
After the micro-batches of a step, every gradient is all-reduced with SUM over `dp_cp_group()`
(data x context parallel) and divided by dp_size: the CP sum turns the shares into the gradient
of each sequence's mean, the division averages over the data-parallel replicas. Every rank of the
group then holds the same gradient and takes the same optimizer step, so replicas stay identical
without broadcasting parameters after initialisation.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.parallel.mesh import group_size

_BUCKET_NUMEL = 32 * 1024 * 1024  # gradients are all-reduced in flat fp32 buckets of this size


def broadcast_parameters(model: torch.nn.Module, group) -> None:
    """Make every replica in `group` start from its first rank's parameters (belt and braces: all
    ranks seed identically, but an init that draws different random numbers per rank would drift)."""
    if group_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src=src, group=group)


def reduce_gradients(params: list[torch.nn.Parameter], group, dp_size: int, tp_group=None) -> None:
    """SUM over the dp x cp group, then / dp_size (see the module docstring). With a `tp_group`, the
    gradients each TP rank holds only part of (`tensor_parallel.mark_partial_grad`) are first summed
    over it."""
    from lctrain.parallel.tensor_parallel import reduce_partial_grads

    reduce_partial_grads(params, tp_group)
    if group_size(group) == 1 and dp_size == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    start = 0
    while start < len(grads):
        bucket, numel = [], 0
        while start < len(grads) and (not bucket or numel + grads[start].numel() <= _BUCKET_NUMEL):
            bucket.append(grads[start])
            numel += grads[start].numel()
            start += 1
        flat = torch.cat([g.reshape(-1).float() for g in bucket])
        if group_size(group) > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(dp_size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, tp_group=None, pp_group=None) -> torch.Tensor:
    """Global L2 norm of the gradients, clipped to max_norm (<= 0: only measured).

    Parameters sharded by tensor parallelism (megatron marks them `tensor_model_parallel`) add their
    squares over the TP group; replicated ones count once. Each pipeline stage adds its own
    parameters' squares over `pp_group`; a stage's copy of another stage's parameter (the tied
    embedding, `pipeline.is_pipeline_copy`) is not counted again, but clipped alike."""
    from lctrain.parallel.pipeline import is_pipeline_copy

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    sharded = torch.zeros((), device=device, dtype=torch.float32)
    replicated = torch.zeros((), device=device, dtype=torch.float32)
    for p in params:
        if p.grad is None or is_pipeline_copy(p):
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if group_size(tp_group) > 1:
        dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=tp_group)
    total = sharded + replicated
    if group_size(pp_group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pp_group)
    norm = total.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm


def mean_over_group(value: torch.Tensor, group) -> torch.Tensor:
    """The mean of `value` over the ranks of `group` (`value` itself without a group, or of size 1)."""
    if group_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        value = value / group_size(group)
    return value
