"""model.compile: the blocks' elementwise chains as torch.compile'd functions (one fused kernel each way).

Eager PyTorch runs RMSNorm, the mixers' L2 norm, SwiGLU's silu(gate) * up and RoPE as one kernel per
op, most of them on float32 copies of [tokens, channels] tensors: at 32K tokens and d_model 2048 each
such pass moves 0.5 GB, and a block makes dozens. Compiled, each function below becomes one Triton
kernel forward and one backward that read the bf16 inputs once, compute in float32 in registers and
keep for the backward only what the partitioner finds cheapest (the inputs, a float32 rstd per row),
e.g. SwiGLU no longer keeps silu(gate).

Only these pure-torch functions are compiled, never a module around the mixers' Triton ops or the
attention kernel (those stay opaque: nothing to trace through, no graph breaks, no recompiles
per layer: every layer of a kind calls the same compiled function with the same shapes).
Numerics: the same formulas; intermediate roundings differ (e.g. silu(gate) is no longer rounded to
bf16 before the product), hence a key, off by default (`model.compile: false`).

How a module uses it: modules with a compiled variant carry `compiled = False`; HybridLM sets it on
every such module when model.compile is true (`enable`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKEND = "inductor"  # torch.compile backend (tests trace with aot_eager: same graphs, no code generation)
TRITON_ON_CPU = False  # tests: the hand-written kernels (norms, SwiGLU, RoPE) through the Triton interpreter


def use_triton(x: torch.Tensor) -> bool:
    """Whether the blocks' hand-written Triton kernels (kernels/rms_norm, swiglu, rope) run for x: on
    CUDA (the eager float32 formulas are the CPU path and the kernels' reference)."""
    return x.is_cuda or TRITON_ON_CPU
_COMPILED: dict = {}


def compiled(fn):
    """fn under torch.compile (one per function; shapes become dynamic after a second length). Tensor
    arguments are made contiguous first (a no-op for the blocks' own tensors), so that a strided input
    (e.g. F.conv1d's transposed output on CPU) does not cost a recompilation for its strides."""
    key = (fn, BACKEND)
    if key not in _COMPILED:
        inner = torch.compile(fn, fullgraph=True, dynamic=None, backend=BACKEND)

        def call(*args):
            return inner(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))

        _COMPILED[key] = call
    return _COMPILED[key]


def rms_norm_math(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None):
    """x / sqrt(mean(x^2) + eps) * weight (* silu(gate)), in float32, returned in x's dtype."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    if gate is not None:
        y = (y.float() * F.silu(gate.float())).to(x.dtype)
    return y


def l2norm_math(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu_math(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotate_math(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """RoPE of x [B, T, H, D] with cos / sin [T, rotary_dim] (float32), pairs = the two halves of the
    rotated dims; the rest passes through. In float32, returned in x's dtype."""
    xf = x.float()
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    xr = xf[..., :rotary_dim]
    half = rotary_dim // 2
    out = xr * c + torch.cat([-xr[..., half:], xr[..., :half]], dim=-1) * s
    if rotary_dim < xf.shape[-1]:
        out = torch.cat([out, xf[..., rotary_dim:]], dim=-1)
    return out.to(x.dtype)


def enable(model: torch.nn.Module) -> int:
    """Switch every module of `model` that has a compiled variant to it; returns how many."""
    n = 0
    for m in model.modules():
        if hasattr(type(m), "compiled"):
            m.compiled = True
            n += 1
    return n
