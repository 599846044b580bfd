"""Math only: naive recurrent references, chunkwise torch and Triton implementations of the mixers.

See ``api.py`` for the backends and how Triton kernels register. Nothing here imports
torch.distributed.
"""
from .api import (
    apply_transition,
    apply_transition_transposed,
    check_cu_seqlens,
    delta_rule,
    gated_delta_rule,
    gated_linear_attn,
    register_backend,
    resolve_backend,
    shard_final_state,
    shard_state_grad,
    shard_transition,
)
from .deltaformer import deltaformer, deltaformer_u
from .grouped import grouped_shard_state_grad, grouped_shard_transition
from .loglinear import levels_needed, loglinear_gated_delta_rule, loglinear_gated_linear_attn
from .scalar_decay import scalar_decay_shard_state_grad, scalar_decay_shard_transition

__all__ = [
    "deltaformer", "deltaformer_u", "delta_rule", "gated_delta_rule", "gated_linear_attn",
    "loglinear_gated_delta_rule", "loglinear_gated_linear_attn", "levels_needed",
    "shard_transition", "shard_final_state", "grouped_shard_transition", "shard_state_grad", "grouped_shard_state_grad",
    "scalar_decay_shard_transition", "scalar_decay_shard_state_grad",
    "apply_transition", "apply_transition_transposed",
    "check_cu_seqlens",
    "register_backend", "resolve_backend",
]
