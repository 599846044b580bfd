"""The row-norm Triton kernels (kernels/rms_norm: RMSNorm, gated RMSNorm, L2 norm; interpreter on CPU)
against the float32 formula of the eager autograd Functions: outputs and every gradient."""
from __future__ import annotations

import os

import pytest
import torch

from lctrain.models import fused, layers

triton_ok = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU runs)")


def _grads(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    y = fn(*inputs)
    return [y.detach(), *torch.autograd.grad(y, [t for t in inputs if t is not None], dy)]


CASES = {
    # 37 x 3 rows: not a multiple of the rows per program; D = 48 and 200: not powers of two
    "rms": (lambda x, w: layers.rms_norm(x, w, 1e-6), [(37, 3, 200), (200,)]),
    "gated": (lambda x, w, g: layers.rms_norm(x, w, 1e-6, g), [(2, 37, 3, 48), (48,), (2, 37, 3, 48)]),
    "l2": (lambda x: layers.l2_norm(x, 1e-6), [(2, 37, 3, 48)]),
}


@triton_ok
@pytest.mark.parametrize("case", sorted(CASES))
def test_norm_kernels_equal_the_float32_formula(case, monkeypatch):
    fn, shapes = CASES[case]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*s, generator=g) + (1.0 if len(s) == 1 else 0.0) for s in shapes]
    dy = torch.randn(*shapes[0], generator=g)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs, dy = [t.to(device) for t in inputs], dy.to(device)
    monkeypatch.setattr(fused, "TRITON_ON_CPU", False)  # the reference: the formula on CPU tensors
    ref = _grads(fn, [t.cpu() for t in inputs], dy.cpu())
    monkeypatch.setattr(fused, "TRITON_ON_CPU", True)
    got = _grads(fn, inputs, dy)
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5, msg=f"{case} output/grad {i}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(CASES))
def test_norm_kernels_on_gpu(case, monkeypatch):
    test_norm_kernels_equal_the_float32_formula(case, monkeypatch)
