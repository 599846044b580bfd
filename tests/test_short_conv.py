"""The causal depthwise short conv: Triton kernels (interpreter on CPU) and the F.conv1d path against
the tap-by-tap reference, outputs and the gradients of x, weight and prefix; the model's ShortConv
routes to the kernel on CUDA."""
from __future__ import annotations

import os

import pytest
import torch
from lctrain.kernels.short_conv import causal_conv1d

triton_ok = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU runs)")


def _inputs(B, T, C, K, with_prefix, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g).to(device, dtype).requires_grad_(True)
    w = torch.randn(C, K, generator=g).to(device).requires_grad_(True)
    p = torch.randn(B, K - 1, C, generator=g).to(device, dtype).requires_grad_(True) if with_prefix else None
    dy = torch.randn(B, T, C, generator=g).to(device, dtype)
    return x, w, p, dy


def _run(backend, x, w, p, dy, activation):
    y = causal_conv1d(x, w, p, activation, backend=backend)
    inputs = [t for t in (x, w, p) if t is not None]
    return [y.detach(), *torch.autograd.grad(y, inputs, dy)]


@triton_ok
@pytest.mark.parametrize("K,with_prefix,activation", [(4, False, True), (4, True, True), (3, True, False),
                                                      (1, False, True)])
def test_triton_conv_equals_reference(K, with_prefix, activation):
    # T and C not multiples of the 64 x 128 tile, B = 2: the masks and the per-tile dw sums
    x, w, p, dy = _inputs(2, 70, 136, K, with_prefix)
    ref = _run("naive", x, w, p, dy, activation)
    for backend in ("triton", "torch"):
        got = _run(backend, x, w, p, dy, activation)
        for name, a, b in zip(["y", "dx", "dw", "dprefix"], got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{backend} {name}")


def test_short_conv_module_uses_the_chosen_backend():
    from lctrain.models.layers import ShortConv

    conv = ShortConv(8, 4)
    x = torch.randn(1, 5, 8)
    y_torch, tail = conv(x)
    conv.backend = "naive"
    y_naive, tail2 = conv(x)
    torch.testing.assert_close(y_torch, y_naive)
    assert torch.equal(tail, tail2) and torch.equal(tail, x[:, -3:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_conv_bf16_on_gpu_matches_float32_reference():
    x, w, p, dy = _inputs(1, 4096 + 17, 2048, 4, True, device="cuda", dtype=torch.bfloat16)
    got = _run("triton", x, w, p, dy, True)
    ref = _run("naive", x.detach().float().requires_grad_(), w, p.detach().float().requires_grad_(), dy.float(), True)
    for name, a, b in zip(["y", "dx", "dw", "dprefix"], got, ref):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item(), msg=name)


@triton_ok
def test_triton_conv_backward_programs_loop_over_tiles(monkeypatch):
    """Fewer backward programs along T than tiles (4 tiles, 3 programs): each loops over its tiles and
    keeps one dw partial."""
    from lctrain.kernels.short_conv import triton as conv_triton

    monkeypatch.setattr(conv_triton, "BWD_PROGRAMS_T", 3)
    x, w, p, dy = _inputs(1, 200, 40, 4, True)
    ref = _run("naive", x, w, p, dy, True)
    got = _run("triton", x, w, p, dy, True)
    for name, a, b in zip(["y", "dx", "dw", "dprefix"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_triton_conv_refuses_more_taps_than_its_accumulators():
    x, w, _, _ = _inputs(1, 8, 4, 5, False)
    with pytest.raises(ValueError, match="at most 4 taps"):
        causal_conv1d(x, w, backend="triton")
