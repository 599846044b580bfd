"""AdamW with the usual decay groups, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases (any tensor of rank < 2) and embeddings do not.

    Embeddings are found by module type (any class whose name contains "Embedding", which covers
    nn.Embedding and megatron's VocabParallelEmbedding), so a tied output head is not decayed either.
    Each parameter appears once even when shared.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if "Embedding" in type(module).__name__:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, train_cfg, shard_group=None) -> torch.optim.Optimizer:
    """AdamW; with `shard_group` (the data x context-parallel replicas, when train.shard_optimizer is
    on) a ZeRO-1 `ZeroRedundancyOptimizer`: each replica keeps the Adam state of, and updates, only
    its share of the parameters, then broadcasts them. torch's, because megatron-core's distributed
    optimizer allocates its buffers on CUDA only (no gloo/CPU test could run it) and DeepSpeed's
    ZeRO wants to own the model, the backward and the step. Gradients are still all-reduced whole
    (grad_comm.reduce_gradients), so the update is exactly the unsharded one."""
    kwargs = dict(lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8)
    groups = param_groups(model, train_cfg.weight_decay)
    if shard_group is not None and torch.distributed.get_world_size(shard_group) > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=shard_group, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based).

    Linear warmup from 1/warmup to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio`
    at the last step, flat afterwards.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    total, warmup, floor = train_cfg.steps, train_cfg.warmup_steps, train_cfg.min_lr_ratio
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps=warmup, total_steps=total, min_lr_ratio=floor)
    )
