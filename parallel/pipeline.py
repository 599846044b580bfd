"""Pipeline parallelism: contiguous layer ranges per stage, run by megatron-core's 1F1B schedule.

- ``stage_layers(n_layers, pp, stage)``: the blocks stage ``stage`` of ``pp`` holds (contiguous, equal
  counts); the first stage also holds the embedding, the last the final norm, the LM head and the loss.
- ``PipelineSchedule``: one optimizer step's micro-batches through megatron-core's
  ``forward_backward_pipelining_without_interleaving`` (what ``get_forward_backward_func`` returns for
  pp > 1 without virtual stages): warm-up forwards, one-forward-one-backward, cool-down backwards,
  activations and their gradients passed between neighbouring stages by its ``P2PCommunicator``.
- ``mark_pipeline_copy`` / ``is_pipeline_copy``: with tied embeddings the last stage holds a copy of
  the embedding table for its head (as megatron-core does); the copy's gradient is summed with the
  first stage's over ``mesh.embedding_group()`` (``sum_tied_embedding_grads``), so both take the same
  update, and the gradient norm counts the table once.

On CPU (gloo) the schedule runs unchanged but for two bookkeeping allocations that megatron-core 0.16
places on CUDA whatever the model's device: the schedule's token counter (``torch.zeros(...,
device="cuda")``) and the P2P receive buffers (``device=torch.cuda.current_device()``). While the
schedule runs on CPU, ``_cuda_allocations_on_cpu`` sends those to the CPU (a TorchFunctionMode that
rewrites a factory call's CUDA ``device=`` to "cpu", and ``torch.cuda.current_device`` answering 0, which
that mode then maps too). Nothing else changes: the same schedule, P2P calls (non-batched
isend/irecv, which gloo has) and autograd calls run as on the GPU. On CUDA no shim is installed.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Sequence
from unittest import mock

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from .mesh import group_size

PIPELINE_COPY = "pipeline_copy"


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """The (global) indices of the blocks stage `stage` of `pp` holds: n_layers / pp contiguous ones."""
    if pp < 1 or not 0 <= stage < pp:
        raise ValueError(f"pipeline stage {stage} of parallel.pp={pp} does not exist")
    if n_layers < pp or n_layers % pp:
        raise ValueError(f"{n_layers} layers do not split into parallel.pp={pp} equal stages; choose pp dividing the "
                         "number of layers (model.layer_pattern)")
    per = n_layers // pp
    return range(stage * per, (stage + 1) * per)


def mark_pipeline_copy(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Declare `param` a copy of a parameter another stage owns (the last stage's tied embedding)."""
    setattr(param, PIPELINE_COPY, True)
    return param


def is_pipeline_copy(param: torch.Tensor) -> bool:
    return bool(getattr(param, PIPELINE_COPY, False))


def sum_tied_embedding_grads(weight: torch.nn.Parameter | None, group) -> None:
    """Sum the tied embedding table's gradient over the first and last stage (`mesh.embedding_group()`;
    nothing when None): the embedding lookup's part and the LM head's part make the full gradient."""
    if weight is None or group is None or group_size(group) == 1:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, op=dist.ReduceOp.SUM, group=group)


class _CudaDeviceToCpu(TorchFunctionMode):
    """Factory calls asking for a CUDA device get the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


@contextmanager
def _cuda_allocations_on_cpu():
    with mock.patch.object(torch.cuda, "current_device", lambda: 0), _CudaDeviceToCpu():
        yield


class _StageView:
    """What megatron-core's schedule asks of "the model" (``config``, ``model_type``,
    ``set_input_tensor``), without wrapping our module: its parameter names stay the full model's."""

    def __init__(self, module: torch.nn.Module, config):
        from megatron.core.enums import ModelType

        self.module, self.config, self.model_type = module, config, ModelType.encoder_or_decoder
        self.input_tensor = None

    def set_input_tensor(self, tensors) -> None:
        self.input_tensor = tensors[0] if isinstance(tensors, (list, tuple)) else tensors


class PipelineSchedule:
    """The 1F1B schedule of one stage. `forward(batch, stage_input)` is the stage's work on one
    micro-batch: `stage_input` is None on the first stage, else the previous stage's output (the
    residual stream, shape `activation_shape`, dtype `dtype`); it returns that output, and on the last
    stage `(loss, report)` instead: `loss` is what the backward starts from (this rank's share of the
    micro-batch's mean loss, as step.lm_loss gives it), `report` a detached value collected per
    micro-batch."""

    def __init__(self, module: torch.nn.Module, *, pp_group, cp_size: int, n_layers: int, hidden_size: int,
                 device: torch.device):
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.pp_group, self.cp_size, self.device = pp_group, cp_size, device
        self.stage, self.stages = dist.get_rank(pp_group), group_size(pp_group)
        self.is_first, self.is_last = self.stage == 0, self.stage == self.stages - 1
        # batch_p2p_comm: NCCL batches the sends and receives of one exchange; gloo takes them one by one.
        # deallocate_pipeline_outputs: a sent activation's storage is freed at once (its graph stays).
        self.config = TransformerConfig(num_layers=n_layers, hidden_size=hidden_size, num_attention_heads=1,
                                        pipeline_model_parallel_size=self.stages, pipeline_dtype=torch.float32,
                                        batch_p2p_comm=device.type == "cuda", deallocate_pipeline_outputs=True)
        self.view = _StageView(module, self.config)

    def forward_backward(self, forward: Callable, batches: Sequence, activation_shape: Sequence[int],
                         dtype: torch.dtype) -> list:
        """Forward and backward of every micro-batch of `batches` (their gradients accumulate in the
        parameters, each micro-batch's loss divided by len(batches) as in the one-stage loop); the
        stages pass activations of `activation_shape` and `dtype`. Returns the reports of the
        micro-batches on the last stage, [] elsewhere."""
        from megatron.core.pipeline_parallel.schedules import (
            forward_backward_pipelining_without_interleaving,
            get_forward_backward_func,
        )

        schedule = get_forward_backward_func(pp_size=self.stages, vp_size=None)
        assert schedule is forward_backward_pipelining_without_interleaving
        view, cp = self.view, self.cp_size
        self.config.pipeline_dtype = dtype  # the dtype of P2P receive buffers

        def forward_step(data_iterator, _model):
            stage_input = None if self.is_first else view.input_tensor
            out = forward(next(data_iterator), stage_input)
            if not self.is_last:
                return out, None
            loss, report = out
            # megatron-core multiplies the loss by the CP size (its gradient reduction averages over
            # dp x cp; ours sums the CP shares, step.lm_loss) and divides it by the micro-batches
            return loss, lambda output: (output / cp, report)

        shape = tuple(int(s) for s in activation_shape)
        on_cpu = _cuda_allocations_on_cpu() if self.device.type == "cpu" else nullcontext()
        with on_cpu:
            return schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=[view],
                            num_microbatches=len(batches), seq_length=shape[1], micro_batch_size=shape[0],
                            adjust_tensor_shapes_fn=lambda recv, send: ([shape], [shape]))

    def from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """`value` as the last stage holds it, on every stage."""
        dist.broadcast(value, src=dist.get_global_rank(self.pp_group, self.stages - 1), group=self.pp_group)
        return value
