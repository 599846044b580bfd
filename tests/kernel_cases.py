"""Shared by the Triton kernel tests (CPU interpreter and GPU): call an op by kind, take its outputs and all
gradients."""
import os

import pytest
import torch
from lctrain.kernels import delta_rule, gated_delta_rule, gated_linear_attn

# the Triton kernels on the CPU interpreter and, marked gpu, on CUDA
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                 reason="needs TRITON_INTERPRET=1 (set by conftest on CPU runs)")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs CUDA")]),
]

# K and V blocks of 16 everywhere, so every K / V loop and block grid of the Triton kernels runs more
# than one block (dq/dk then sums several dgam parts); few warps for the interpreter
SMALL_BLOCKS = dict(BVP=16, BVO=16, BVS=16, BVSB=16, BKW=16, BVW=16, BKS=16, BKD=16, BVD=16, BKB=16,
                    BVB=16, warps_seq=2, warps_seqb=2, warps_dv=2, warps_dqk=2, warps_out=2, warps_wy=2,
                    warps_solve=1, warps_wyb=2)


def call(kind, x, backend, **extra):
    """Run the `kind` op ("delta", "gated_delta", "gla") on the inputs dict `x` with initial state and
    final state; `extra` keywords (cu_seqlens) go to the op."""
    kw = dict(initial_state=x.get("initial_state"), output_final_state=True, backend=backend, **extra)
    if kind == "delta":
        return delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw)
    if kind == "gated_delta":
        return gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)
    return gated_linear_attn(x["q"], x["k"], x["v"], x["g"], **kw)


def outputs_and_grads(kind, x, backend, do, dS, **extra):
    """(o, final_state, {input name: gradient}) for the loss sum(o * do) + sum(final_state * dS)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if t is not None}
    o, S = call(kind, leaves, backend, **extra)
    loss = (o.float() * do).sum() + (S * dS).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), S.detach(), dict(zip(leaves, grads))
