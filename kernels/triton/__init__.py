"""Triton kernels for the chunkwise recurrences (backend="triton" of lctrain.kernels).

``ops`` holds the entry points that ``lctrain.kernels.api`` dispatches to; ``chunk_kernels`` the
kernels themselves. Importing this package imports triton.
"""
from .ops import (delta_rule, gated_delta_rule, gated_linear_attn, shard_state_grad,
                  shard_transition)

__all__ = ["delta_rule", "gated_delta_rule", "gated_linear_attn", "shard_transition",
           "shard_state_grad"]
