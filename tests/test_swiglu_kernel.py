"""silu(gate) * up as Triton kernels (kernels/swiglu; interpreter on CPU) against the eager ops."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from lctrain.kernels.swiglu import swiglu

triton_ok = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU runs)")


def _run(fn, g, u, dh):
    g, u = g.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
    h = fn(g, u)
    return [h.detach(), *torch.autograd.grad(h, (g, u), dh)]


def _check(device, dtype, shape, tol):
    gen = torch.Generator().manual_seed(0)
    g, u, dh = (torch.randn(*shape, generator=gen).mul(3).to(device, dtype) for _ in range(3))
    got = _run(lambda a, b: swiglu(a, b, use_triton=True), g, u, dh)
    ref = _run(lambda a, b: F.silu(a) * b, g, u, dh)
    for name, a, b in zip(["h", "dgate", "dup"], got, ref):
        torch.testing.assert_close(a, b, **tol, msg=name)


@triton_ok
def test_swiglu_kernel_equals_eager():
    # 3 x 1000 elements: a partial last block of the 2048-element programs
    _check("cuda" if torch.cuda.is_available() else "cpu", torch.float32, (3, 1000), dict(rtol=1e-5, atol=1e-6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swiglu_kernel_bf16_matches_eager_rounding():
    # the kernel rounds where eager bf16 rounds: at most one bf16 ulp apart
    _check("cuda", torch.bfloat16, (4096, 5472), dict(rtol=8e-3, atol=1e-5))
