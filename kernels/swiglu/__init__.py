"""SwiGLU's activation silu(gate) * up as one Triton kernel each way (on CUDA), keeping only gate and up
for the backward: eager PyTorch also keeps silu(gate) (one more hidden-size tensor per token: 10.7 KiB
at d_model 2048) and makes three passes. The roundings are eager bf16's: silu(gate) is rounded to the
input dtype before the product, and so are the gradients of silu(gate) and up, so the results match
the eager ops (``tests/test_swiglu_kernel.py``)."""
from .triton import swiglu

__all__ = ["swiglu"]
