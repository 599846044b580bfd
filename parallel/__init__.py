"""Communication only: mesh, context-parallel state passing, halo exchange, Ulysses attention,
tensor-parallel layers.

- ``lctrain.parallel.mesh``: ``init_mesh`` / ``destroy_mesh`` and the group queries (megatron-core).
- ``lctrain.parallel.context_parallel(op, group)``: a linear-recurrent op over contiguous CP shards
  (the log-linear ops go to ``loglinear_cp``).
- ``lctrain.parallel.halo.prepend_halo``: previous rank's last tokens (short conv, sliding window).
- ``lctrain.parallel.ulysses.ulysses_attention``: all-to-all attention over the CP group (DeepSpeed).
- ``lctrain.parallel.tensor_parallel``: megatron-core column/row/vocab-parallel layers, full <-> shard states.
- ``lctrain.parallel.pipeline``: stages' layer ranges and megatron-core's 1F1B pipeline schedule.
"""
from .context_parallel import ContextParallelError, ContextParallelOp
from .context_parallel import context_parallel as _context_parallel_base
from .loglinear_cp import LogLinearContextParallelOp
from .loglinear_cp import op_name as _loglinear_op_name
from .mesh import (
    MeshInfo,
    cp_group,
    cp_rank,
    cp_size,
    destroy_mesh,
    dp_cp_group,
    dp_cp_size,
    dp_rank,
    dp_size,
    embedding_group,
    group_size,
    init_mesh,
    is_main,
    mesh_info,
    pp_group,
    pp_rank,
    pp_size,
    tp_group,
    tp_rank,
    tp_size,
)


def context_parallel(op, group, transition: str | None = None):
    """A callable with ``op``'s signature over the local contiguous shard of each rank of ``group``:
    ``ContextParallelOp`` for delta_rule / gated_delta_rule / gated_linear_attn (``transition``: how
    its state passes run, see ``lctrain.parallel.context_parallel.context_parallel``),
    ``LogLinearContextParallelOp`` for loglinear_gated_delta_rule / loglinear_gated_linear_attn."""
    if _loglinear_op_name(op) is not None:
        if transition is not None:
            raise ContextParallelError(f"context_parallel: transition={transition!r} applies to delta_rule, "
                                       "gated_delta_rule and gated_linear_attn only; drop it for the log-linear ops")
        return LogLinearContextParallelOp(op, group)
    return _context_parallel_base(op, group, transition)


__all__ = [
    "context_parallel", "ContextParallelOp", "ContextParallelError", "LogLinearContextParallelOp",
    "MeshInfo", "init_mesh", "destroy_mesh", "mesh_info", "cp_group", "cp_rank", "cp_size",
    "tp_group", "tp_rank", "tp_size",
    "pp_group", "pp_rank", "pp_size", "embedding_group",
    "dp_rank", "dp_size", "dp_cp_group", "dp_cp_size", "is_main", "group_size",
]
