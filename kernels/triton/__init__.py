"""Triton kernels for the chunkwise recurrences (backend="triton" of lctrain.kernels).

``ops`` holds the entry points that ``lctrain.kernels.api`` dispatches to and the launch settings;
the kernels, each beside its launcher, live by stage in ``wy``, ``state``, ``output`` and ``dqdk``,
with what they share in ``common``. Importing this package imports triton.
"""
from .ops import delta_rule, gated_delta_rule, gated_linear_attn, shard_state_grad, shard_transition

__all__ = ["delta_rule", "gated_delta_rule", "gated_linear_attn", "shard_transition",
           "shard_state_grad"]
