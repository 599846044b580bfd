"""RoPE's rotation as a Triton kernel (kernels/rope; interpreter on CPU) against the eager float32
formula of lctrain.models.rope: output and input gradient, at positions that do not start at 0."""
from __future__ import annotations

import os

import pytest
import torch

from lctrain.models import fused
from lctrain.models.rope import RotaryEmbedding

triton_ok = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU runs)")


def _rotate(rope, x, dy, positions, triton):
    fused.TRITON_ON_CPU = triton
    try:
        x = x.detach().clone().requires_grad_(True)
        cos, sin = rope.cos_sin(positions, torch.float32)
        y = rope.rotate(x, cos, sin)
        return y.detach(), torch.autograd.grad(y, x, dy)[0]
    finally:
        fused.TRITON_ON_CPU = False


@triton_ok
def test_rope_kernel_equals_the_eager_rotation():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rope = RotaryEmbedding(16, base=500.0, scaling="yarn", factor=2.0, original_max_position=8).to(device)
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(2, 37, 3, 16, generator=gen).to(device) for _ in range(2))  # 222 rows: a partial block
    positions = torch.arange(100, 137, device=device)
    got = _rotate(rope, x, dy, positions, True)
    ref = _rotate(rope, x.cpu(), dy.cpu(), positions.cpu(), False) if device == "cuda" else \
        _rotate(rope, x, dy, positions, False)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_kernel_on_gpu():
    test_rope_kernel_equals_the_eager_rotation()
