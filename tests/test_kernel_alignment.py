"""No Triton chunk kernel is launched with a tensor whose data pointer is off a 16-byte boundary.

Triton compiles separate code for such pointers, and on an H200 that code gave wrong dk / dv / dbeta / dg /
d initial_state (kernel_check's "unaligned" cases, 2026-12-01, docs/kernels-notes.md), so the ops hand the
kernels aligned copies of every input (kernels/triton/ops.py, ALIGN_INPUTS): q, k, v, g, beta, the initial state,
cu_seqlens, and in the backward dO and the final-state gradient, which autograd may hand over as views. Here every
kernel launch is intercepted (CPU, Triton interpreter) and its tensor arguments checked, with every one of those
inputs given as a view 4 bytes into its buffer; with the copies turned off the same check must fire, so it can fail.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from lctrain.kernels import delta_rule, gated_delta_rule, gated_linear_attn
from lctrain.kernels.triton import dqdk, fixup, ops, output, state, wy

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU runs)")

KERNEL_MODULES = (wy, state, output, dqdk, fixup)


class _Checked:
    """Stands in for a kernel: records every tensor argument off a 16-byte boundary, then launches."""

    def __init__(self, name, kernel, misaligned):
        self.name, self.kernel, self.misaligned = name, kernel, misaligned

    def __getitem__(self, grid):
        def launch(*args, **kw):
            for i, a in enumerate(list(args) + list(kw.values())):
                if isinstance(a, torch.Tensor) and a.data_ptr() % 16:
                    self.misaligned.append((self.name, i))
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.fixture
def misaligned_launches(monkeypatch):
    """The list of (kernel, argument index) launched with a misaligned tensor while the test runs."""
    seen: list = []
    for mod in KERNEL_MODULES:
        for name in dir(mod):
            if name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, _Checked(name, getattr(mod, name), seen))
    return seen


def shifted(t):
    """``t`` as a contiguous view one element (4 bytes) into a fresh buffer: a pointer off 16 bytes."""
    buf = t.new_empty(t.numel() + 1)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16
    return view


def inputs(kind, B=1, T=20, H=2, D=16, N=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(q=r(B, T, H, D), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D),
                g=F.logsigmoid(r(B, T, H) + 2.0) if kind != "delta" else None,
                beta=torch.sigmoid(r(B, T, H)) if kind != "gla" else None,
                initial_state=r(N or B, H, D, D))


def run_shifted(kind, x, shift_only=None, **kw):
    """fwd + bwd of the op with (every, or only ``shift_only``) input and both output gradients misaligned."""
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    placed = {n: shifted(t) if shift_only in (None, n) else t for n, t in leaves.items()}
    op_kw = dict(initial_state=placed["initial_state"], output_final_state=True, backend="triton", **kw)
    if kind == "delta":
        o, S = delta_rule(placed["q"], placed["k"], placed["v"], placed["beta"], **op_kw)
    elif kind == "gated_delta":
        o, S = gated_delta_rule(placed["q"], placed["k"], placed["v"], placed["g"], placed["beta"], **op_kw)
    else:
        o, S = gated_linear_attn(placed["q"], placed["k"], placed["v"], placed["g"], **op_kw)
    gen = torch.Generator().manual_seed(1)
    do, dS = torch.randn(o.shape, generator=gen), torch.randn(S.shape, generator=gen)
    if shift_only in (None, "do"):
        do = shifted(do)
    if shift_only in (None, "dS"):
        dS = shifted(dS)
    torch.autograd.backward([o, S], [do, dS])
    return o, S, {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("kind", ["delta", "gated_delta", "gla"])
def test_every_launch_of_a_misaligned_call_is_aligned(kind, misaligned_launches):
    x = inputs(kind)
    run_shifted(kind, x)
    assert not misaligned_launches


def test_packed_documents_with_a_misaligned_cu_seqlens(misaligned_launches):
    x = inputs("gated_delta", T=40, N=3)
    cu = shifted(torch.tensor([0, 7, 29, 40], dtype=torch.int32))
    run_shifted("gated_delta", x, cu_seqlens=cu)
    assert not misaligned_launches


def test_cp_primitives_and_overlap_with_misaligned_inputs(misaligned_launches):
    from lctrain.kernels import shard_final_state, shard_state_grad, shard_transition
    from lctrain.kernels.triton.cp_overlap import overlapped
    x = inputs("gated_delta", T=64)
    s = {n: shifted(t) for n, t in x.items()}
    kw = dict(g=s["g"], beta=s["beta"], backend="triton")
    shard_transition("gated_delta", s["k"], s["v"], **kw)
    shard_final_state("gated_delta", s["k"], s["v"], initial_state=s["initial_state"], **kw)
    shard_state_grad("gated_delta", s["q"], s["k"], shifted(torch.randn_like(x["v"])), **kw)

    class Link:   # a middle rank's exchanges, answering with misaligned views
        start_known = start_first = end_first = False

        def end_known(self, u):
            return False

        def start(self, A, B):
            return shifted(torch.randn_like(B))

        def end(self, G, At, u):
            return shifted(torch.randn_like(G))
    leaves = {n: t.clone().requires_grad_() for n, t in s.items() if n != "initial_state"}
    o, S = overlapped(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"], link=Link())
    torch.autograd.backward([o, S], [shifted(torch.randn_like(o)), shifted(torch.randn_like(S))])
    assert not misaligned_launches


@pytest.mark.parametrize("only", ["q", "beta", "initial_state", "do", "dS"])
def test_the_check_fires_without_the_aligning_copies(only, misaligned_launches, monkeypatch):
    """ALIGN_INPUTS off: one misaligned input (or output gradient) alone reaches a kernel, so the check above can
    fail, and dO / dS really arrive in the backward as the misaligned views they were given as."""
    monkeypatch.setattr(ops, "ALIGN_INPUTS", False)
    run_shifted("delta", inputs("delta"), shift_only=only)
    assert misaligned_launches


def test_results_are_the_same_with_the_copies(monkeypatch):
    """The copies change no value: misaligned inputs give the results of aligned ones, bit for bit."""
    x = inputs("gated_delta", seed=3)
    o1, S1, g1 = run_shifted("gated_delta", x)
    o2, S2, g2 = run_shifted("gated_delta", x, shift_only="none")
    assert torch.equal(o1, o2) and torch.equal(S1, S2)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
