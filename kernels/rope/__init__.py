"""RoPE rotation of q / k as one Triton kernel each way (on CUDA): the eager path runs ~8 float32
passes over [tokens, heads, head_dim] per tensor, forward and backward (and again in a checkpoint
recomputation). Same formula and float32 arithmetic as ``lctrain.models.rope``; rounds once."""
from .triton import rope_rotate

__all__ = ["rope_rotate"]
