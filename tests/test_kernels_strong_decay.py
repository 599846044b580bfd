"""Strong decays in a sequence's (or a packed document's) last, partial chunk: the Triton kernels stay finite
and equal the naive recurrence.

The rows of a chunk past the sequence's end load their in-chunk cumulative decay gam as 0; once the valid
rows' gam fell below about -88, exp(0 - gam_j) overflowed float32 and the inf times those rows' zero inputs
made dk, dv and dg NaN. Mamba-2-style and Gated DeltaNet layers reach such decays in training (an H200 run of
sniah_ordering: per-token log-decay down to -16.6, NaN gradients from step 38 on, in bfloat16 and float32).
Interpreter, float32; the same cases marked gpu on CUDA.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import TRITON_DEVICES
from lctrain.kernels import (
    gated_delta_rule,
    gated_linear_attn,
    levels_needed,
    loglinear_gated_delta_rule,
    loglinear_gated_linear_attn,
)

H, K, V = 2, 32, 32


def strong_inputs(T, kind, seed, levels=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = dict(q=r(1, T, H, K), k=F.normalize(r(1, T, H, K), dim=-1), v=r(1, T, H, V),
             g=-5.0 - 15.0 * torch.rand(1, T, H, generator=gen, dtype=torch.float64))  # -5 .. -20 a token
    if kind in ("gated_delta", "ll_gdn"):
        x["beta"] = torch.sigmoid(r(1, T, H))
    if levels:
        x["lam"] = F.softplus(r(1, T, H, levels))
    return x


def run(kind, x, backend, cu=None):
    args = [x[n] for n in ("q", "k", "v", "g", "beta", "lam") if n in x]
    kw = dict(backend=backend, output_final_state=False)
    if cu is not None:
        kw["cu_seqlens"] = cu
    op = {"gated_delta": gated_delta_rule, "gla": gated_linear_attn, "ll_gdn": loglinear_gated_delta_rule,
          "ll_mamba2": loglinear_gated_linear_attn}[kind]
    return op(*args, **kw)[0]


def outputs_and_grads(kind, x, backend, do, cu=None):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    o = run(kind, leaves, backend, cu)
    grads = torch.autograd.grad((o.double() * do).sum(), list(leaves.values()))
    return o.detach(), dict(zip(leaves, grads))


def check(kind, x, device, cu=None, tol=1e-4):
    do = torch.randn(x["v"].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    if cu is None:
        ref = outputs_and_grads(kind, x, "naive", do)
    else:  # the naive recurrence, each document alone
        refs = [outputs_and_grads(kind, {n: t[:, s:e] for n, t in x.items()}, "naive", do[:, s:e])
                for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
        ref = (torch.cat([o for o, _ in refs], 1), {n: torch.cat([g[n] for _, g in refs], 1) for n in x})
    dev = {n: t.to(device, torch.float32) for n, t in x.items()}
    o, grads = outputs_and_grads(kind, dev, "triton", do.to(device), None if cu is None else cu.to(device))
    rel = lambda a, b: ((a.cpu().double() - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
    assert torch.isfinite(o).all(), f"{kind}: output not finite"
    assert rel(o, ref[0]) < tol, f"{kind}: output"
    for n, g in grads.items():
        assert torch.isfinite(g).all(), f"{kind}: grad of {n} not finite"
        if n != "g":
            assert rel(g, ref[1][n]) < tol, f"{kind}: grad of {n}"
    # dg is a sum of q.dq - k.dk terms that cancel almost exactly under strong decays (the true dg is tiny where
    # the state forgets), so its error is judged against the size of those terms: in the interpreter 1.6e-4 to
    # 8e-4 of |dg| itself, on an H200 (TF32 dots) 0.39 and 0.68 of |dg| (2026-12-01), with every other
    # gradient within 5e-3 there
    ref_dq, ref_dk = ref[1]["q"], ref[1]["k"]
    terms = (x["q"] * ref_dq).sum(-1).norm() + (x["k"] * ref_dk).sum(-1).norm()
    err = ((grads["g"].cpu().double() - ref[1]["g"]).norm() / terms).item()
    assert err < tol, f"{kind}: grad of g off by {err:.2e} of the q.dq, k.dk terms it is the difference of"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", ["gated_delta", "gla"])
def test_strong_decay_in_a_partial_last_chunk(kind, device):
    """T = 100: the second chunk holds 36 rows, the decay over them reaches ~ -450."""
    check(kind, strong_inputs(100, kind, seed=1), device, tol=1e-4 if device == "cpu" else 5e-3)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", ["gated_delta", "gla"])
def test_strong_decay_in_packed_documents_ending_mid_chunk(kind, device):
    """Packed documents of 7, 77, 64 and 30 tokens: three end inside a chunk."""
    cu = torch.tensor([0, 7, 84, 148, 178], dtype=torch.int32)
    check(kind, strong_inputs(178, kind, seed=2), device, cu=cu, tol=1e-4 if device == "cpu" else 5e-3)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", ["ll_gdn", "ll_mamba2"])
def test_strong_decay_in_the_loglinear_kernels(kind, device):
    """T = 100 through the fused log-linear kernels (their intra-chunk stage masks the same rows)."""
    x = strong_inputs(100, kind, seed=3, levels=levels_needed(100))
    check(kind, x, device, tol=1e-4 if device == "cpu" else 5e-3)
