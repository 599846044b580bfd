"""Row norms of the blocks as Triton kernels: RMSNorm (optionally gated by silu(gate)) and the L2 norm.

The math is the float32 formula of ``lctrain.models.layers`` (its eager autograd Functions are the
reference: ``tests/test_rms_norm_kernel.py``); these kernels compute it in one pass each way, reading
the bf16 inputs once, instead of a chain of float32 passes over [tokens, channels]."""
from .triton import row_norm_bwd, row_norm_fwd

__all__ = ["row_norm_fwd", "row_norm_bwd"]
