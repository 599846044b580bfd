"""Tensor parallelism: megatron-core's tensor-parallel layers behind three small factories, and the
bookkeeping that makes a TP model the exact shard of the one-process model.

Factories (each returns a plain ``nn.Linear`` / ``nn.Embedding`` when the TP group is None or of
size 1, so tp=1 models are unchanged, state-dict keys included):

- ``column_linear(in, out, tp_group)``: megatron ``ColumnParallelLinear`` (output features split,
  input replicated; its backward all-reduces the input gradient over the TP group);
- ``row_linear(in, out, tp_group)``: ``RowParallelLinear`` (input features split, output all-reduced);
- ``vocab_embedding(vocab, dim, tp_group)``: ``VocabParallelEmbedding`` (vocabulary rows split).

megatron's layers are built with ``use_cpu_initialization=True, perform_initialization=False`` so
they run on CPU/gloo (no CUDA calls) and draw no random numbers: the weights come from the full
model instead (``shard_from_full``), which makes every layout start from the tp=1 model.

Every split parameter carries ``tp_split_dim`` (the dim split into tp contiguous chunks, rank r holding
chunk r) plus megatron's ``tensor_model_parallel`` / ``partition_dim`` (read by the grad-norm clip).
``mark_split(p, dim)`` marks per-head parameters the modules own directly (A_log, dt_bias, conv
channels): they follow their heads. ``mark_partial_grad(p)`` marks a replicated parameter applied
only to this rank's heads (the per-head-dim weight of the gated output norm): each TP rank then
holds part of its gradient, and ``reduce_partial_grads`` sums them over the TP group; the input of
such a replicated projection goes through ``to_tp_region`` so that its gradient is summed as well.

``full_state_dict`` / ``shard_from_full`` convert between a rank's state and the layout-free full
state (used by model construction and by checkpoints that reshard). ``vocab_parallel_cross_entropy``
is megatron's, with ignored labels (-100) masked.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from .mesh import group_size

TP_SPLIT_DIM = "tp_split_dim"
TP_PARTIAL_GRAD = "tp_partial_grad"

_configs: dict = {}


def _config(tp: int):
    from megatron.core.model_parallel_config import ModelParallelConfig

    if tp not in _configs:
        _configs[tp] = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                           perform_initialization=False, params_dtype=torch.float32)
    return _configs[tp]


def _no_init(weight):  # weights are copied from the full model (shard_from_full)
    return weight


def mark_split(param: nn.Parameter, dim: int) -> nn.Parameter:
    """Declare `param` the rank's chunk `dim`-wise of a full tensor split over the TP group."""
    setattr(param, TP_SPLIT_DIM, dim)
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1
    return param


def mark_partial_grad(param: nn.Parameter) -> nn.Parameter:
    setattr(param, TP_PARTIAL_GRAD, True)
    return param


@functools.cache
def _column_cls():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        """ColumnParallelLinear returning only the output (no bias tuple); output stays split."""

        get_extra_state = nn.Module.get_extra_state  # no empty `_extra_state` key: state dicts match nn.Linear's

        def forward(self, x):  # type: ignore[override]
            return super().forward(x)[0]

    return ColumnLinear


@functools.cache
def _row_cls():
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowLinear(RowParallelLinear):
        """RowParallelLinear (input split, output all-reduced) returning only the output. With
        `partial_output` set (sequence parallelism, `Block`) it returns this rank's partial sum, the local
        matmul alone, and the caller reduce-scatters it along the sequence instead."""

        get_extra_state = nn.Module.get_extra_state
        partial_output = False

        def forward(self, x):  # type: ignore[override]
            if self.partial_output:
                return torch.nn.functional.linear(x, self.weight)
            return super().forward(x)[0]

    return RowLinear


def column_linear(in_features: int, out_features: int, tp_group=None) -> nn.Module:
    tp = group_size(tp_group)
    if tp == 1:
        return nn.Linear(in_features, out_features, bias=False)
    layer = _column_cls()(in_features, out_features, config=_config(tp), init_method=_no_init, bias=False,
                          gather_output=False, tp_group=tp_group)
    mark_split(layer.weight, 0)
    return layer


def skip_row_all_reduce(module: nn.Module) -> None:
    """Make every row-parallel layer inside `module` return its partial sum (see `_row_cls`)."""
    if not _row_cls.cache_info().currsize:
        return  # no row-parallel layer was ever built
    for m in module.modules():
        if isinstance(m, _row_cls()):
            m.partial_output = True


def row_linear(in_features: int, out_features: int, tp_group=None) -> nn.Module:
    tp = group_size(tp_group)
    if tp == 1:
        return nn.Linear(in_features, out_features, bias=False)
    layer = _row_cls()(in_features, out_features, config=_config(tp), init_method=_no_init, bias=False,
                       input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
    mark_split(layer.weight, 1)
    return layer


def vocab_embedding(vocab_size: int, dim: int, tp_group=None) -> nn.Module:
    tp = group_size(tp_group)
    if tp == 1:
        return nn.Embedding(vocab_size, dim)
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    layer = VocabParallelEmbedding(vocab_size, dim, init_method=_no_init, config=_config(tp), tp_group=tp_group)
    mark_split(layer.weight, 0)
    return layer


def to_tp_region(x: torch.Tensor, tp_group) -> torch.Tensor:
    """x entering computation split over the TP group without a column-parallel layer of megatron's
    (a replicated projection applied for this rank's heads, the chunked loss's head): identity forward,
    the gradient summed over the TP group in the backward (megatron's copy-to-TP-region)."""
    if group_size(tp_group) == 1:
        return x
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x, tp_group)


# --------------------------------------------------------------------------------- sequence parallelism

def _all_gather_dim1(x: torch.Tensor, tp_group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(tp_group))]
    dist.all_gather(parts, x.contiguous(), group=tp_group)
    return torch.cat(parts, dim=1)


def _own_slice_dim1(x: torch.Tensor, tp_group) -> torch.Tensor:
    return x.chunk(group_size(tp_group), dim=1)[dist.get_rank(tp_group)].contiguous()


class _GatherSequence(torch.autograd.Function):
    """[B, T/tp, ...] slices -> the whole [B, T, ...] on every TP rank. Backward: this rank's slice of
    the gradient, which is already whole (the column-parallel layers and `to_tp_region` behind it sum
    the TP ranks' input gradients, as they do for the replicated input of plain TP)."""

    @staticmethod
    def forward(ctx, x, tp_group):
        ctx.tp_group = tp_group
        return _all_gather_dim1(x, tp_group)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice_dim1(grad, ctx.tp_group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Partial sums [B, T, ...] on every TP rank -> this rank's slice [B, T/tp, ...] of their sum
    (what replaces the row-parallel all-reduce). Backward: the slices' gradients gathered."""

    @staticmethod
    def forward(ctx, x, tp_group):
        ctx.tp_group = tp_group
        chunks = [c.contiguous() for c in x.chunk(group_size(tp_group), dim=1)]
        out = torch.empty_like(chunks[dist.get_rank(tp_group)])
        dist.reduce_scatter(out, chunks, group=tp_group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim1(grad, ctx.tp_group), None


class _ScatterSequence(torch.autograd.Function):
    """The whole [B, T, ...] (identical on every TP rank) -> this rank's slice [B, T/tp, ...].
    Backward: the slices' gradients gathered (each rank's loss reaches only its own slice)."""

    @staticmethod
    def forward(ctx, x, tp_group):
        ctx.tp_group = tp_group
        return _own_slice_dim1(x, tp_group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim1(grad, ctx.tp_group), None


def check_sequence_split(seq_len: int, tp_group) -> None:
    tp = group_size(tp_group)
    if seq_len % tp:
        raise ValueError(f"parallel.sequence_parallel: the rank's {seq_len} tokens (data.seq_len / parallel.cp) do "
                         f"not split over parallel.tp={tp}; make data.seq_len a multiple of cp * tp")


def gather_sequence(x: torch.Tensor, tp_group) -> torch.Tensor:
    """Sequence parallelism's all-gather along dim 1 (lctrain keeps [batch, sequence, hidden]), written
    with torch.distributed so that it runs on gloo as on NCCL (megatron-core's sequence-parallel regions
    allocate on the current CUDA device and split dim 0). Identity when the group is None or of size 1."""
    if group_size(tp_group) == 1:
        return x
    return _GatherSequence.apply(x, tp_group)


def reduce_scatter_sequence(x: torch.Tensor, tp_group) -> torch.Tensor:
    """This TP rank's contiguous 1/tp of the sequence (dim 1) of the SUM over the group of `x`."""
    if group_size(tp_group) == 1:
        return x
    check_sequence_split(x.shape[1], tp_group)
    return _ReduceScatterSequence.apply(x, tp_group)


def reduce_over_tp(x: torch.Tensor, tp_group) -> torch.Tensor:
    """The sum over the TP group of `x` (megatron's reduce-from-TP-region: all-reduce forward, identity
    backward)."""
    if group_size(tp_group) == 1:
        return x
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, tp_group)


def scatter_sequence(x: torch.Tensor, tp_group) -> torch.Tensor:
    """This TP rank's contiguous 1/tp of the sequence (dim 1) of a tensor whole on every rank."""
    if group_size(tp_group) == 1:
        return x
    check_sequence_split(x.shape[1], tp_group)
    return _ScatterSequence.apply(x, tp_group)


def local_size(n: int, tp_group, what: str) -> int:
    """n / tp, or a ValueError naming `what` when it does not divide."""
    tp = group_size(tp_group)
    if n % tp:
        raise ValueError(f"{what}={n} does not divide over parallel.tp={tp}; make it a multiple of tp")
    return n // tp


# --------------------------------------------------------------------------------- gradients

def reduce_partial_grads(params, tp_group) -> None:
    """Sum over the TP group the gradients of parameters marked by `mark_partial_grad`."""
    if group_size(tp_group) == 1:
        return
    for p in params:
        if getattr(p, TP_PARTIAL_GRAD, False) and p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=tp_group)


# --------------------------------------------------------------------------------- full <-> shard

def split_dims(model: nn.Module) -> dict[str, int]:
    """{state-dict name: split dim} of the model's TP-split parameters (tied names included)."""
    return {name: getattr(p, TP_SPLIT_DIM) for name, p in model.named_parameters(remove_duplicate=False)
            if hasattr(p, TP_SPLIT_DIM)}


def gather_full(t: torch.Tensor, dim: int, tp_group) -> torch.Tensor:
    """The full tensor of which every TP rank holds chunk `dim`-wise `t`."""
    tp = group_size(tp_group)
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)


def take_shard(full: torch.Tensor, dim: int, tp_group) -> torch.Tensor:
    """This rank's chunk `dim`-wise of `full`."""
    tp = group_size(tp_group)
    if tp == 1:
        return full
    return full.chunk(tp, dim=dim)[dist.get_rank(tp_group)]


def full_state_dict(model: nn.Module, state: dict, tp_group) -> dict:
    """`state` (a model state dict, or a per-parameter mapping by name) with every TP-split entry gathered to full
    size."""
    dims = split_dims(model)
    return {k: gather_full(v, dims[k], tp_group) if k in dims and torch.is_tensor(v) else v for k, v in state.items()}


@torch.no_grad()
def shard_from_full(model: nn.Module, full: dict, tp_group) -> None:
    """Copy into the model's parameters and buffers their shards of the full state dict `full`."""
    dims = split_dims(model)
    own = model.state_dict(keep_vars=True)
    for name, tensor in own.items():
        if name not in full:
            raise KeyError(f"full state dict lacks {name!r}")
        src = full[name]
        if name in dims:
            src = take_shard(src, dims[name], tp_group)
        if tuple(src.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shard of shape {tuple(src.shape)} does not fit the parameter "
                             f"{tuple(tensor.shape)}")
        tensor.data.copy_(src)


# --------------------------------------------------------------------------------- loss

def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy [*] of vocabulary-split logits [*, V/tp] (megatron-core's; it
    all-reduces max, target logit and sum-exp over the TP group); ignored labels give 0."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as mc_ce

    valid = labels != ignore_index
    per_token = mc_ce(logits.float(), torch.where(valid, labels, torch.zeros_like(labels)))
    return per_token * valid
