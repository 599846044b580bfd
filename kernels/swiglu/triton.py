"""silu(gate) * up: forward and backward kernels over flat contiguous tensors (module doc of the package)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(h_ptr.dtype.element_ty).to(tl.float32)  # silu rounded as eager's output
    tl.store(h_ptr + offs, (s * u).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def swiglu_bwd_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    s = (g * sig).to(du_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + offs, (dh * s).to(du_ptr.dtype.element_ty), mask=m)
    ds = (dh * u).to(dg_ptr.dtype.element_ty).to(tl.float32)  # eager: the mul's gradient, rounded
    tl.store(dg_ptr + offs, (ds * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=m)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        h = torch.empty_like(g)
        N = g.numel()
        swiglu_fwd_kernel[(triton.cdiv(N, BLOCK),)](g, u, h, N, BLOCK=BLOCK, num_warps=8)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        N = g.numel()
        swiglu_bwd_kernel[(triton.cdiv(N, BLOCK),)](g, u, dh, dg, du, N, BLOCK=BLOCK, num_warps=8)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """silu(gate) * up; the kernels when the inputs are on CUDA (or use_triton=True: the interpreter in
    tests) and share shape and dtype, else the eager ops."""
    if use_triton is None:
        use_triton = gate.is_cuda
    if not use_triton or gate.shape != up.shape or gate.dtype != up.dtype:
        return F.silu(gate) * up
    return _SwiGLU.apply(gate, up)
