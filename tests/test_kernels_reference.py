"""Reference mixers: the chunkwise torch backend against the naive recurrence, the context-parallel
primitives against their definitions, and input validation."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from lctrain.kernels import (
    api,
    apply_transition,
    apply_transition_transposed,
    delta_rule,
    gated_delta_rule,
    gated_linear_attn,
    shard_final_state,
    shard_state_grad,
    shard_transition,
)

from lctrain import kernels

MIXERS = ("delta", "gated_delta", "gla")
# (T, chunk, K, V): ragged last chunks, exact multiples, K != V, chunk larger than T
SHAPES = [(37, 16, 8, 8), (70, 16, 8, 5), (20, 8, 4, 6), (70, 64, 6, 6), (64, 16, 4, 4), (5, 64, 4, 3)]
B, H = 2, 2


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(kind, T, K, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x = dict(
        q=r(B, T, H, K),
        k=F.normalize(r(B, T, H, K), dim=-1),
        v=r(B, T, H, V),
        g=F.logsigmoid(r(B, T, H) + 2.0) if kind != "delta" else None,
        beta=torch.sigmoid(r(B, T, H)) if kind != "gla" else None,
        initial_state=r(B, H, K, V),
    )
    return {n: (t.to(dtype) if t is not None else None) for n, t in x.items()}


def run(kind, x, backend, chunk_size=64, **extra):
    kw = dict(initial_state=x["initial_state"], output_final_state=True, backend=backend,
              chunk_size=chunk_size, **extra)
    if kind == "delta":
        return delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw)
    if kind == "gated_delta":
        return gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)
    return gated_linear_attn(x["q"], x["k"], x["v"], x["g"], **kw)


def forward_and_grads(kind, x, backend, chunk_size, do, dS):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if t is not None}
    o, S = run(kind, leaves, backend, chunk_size)
    loss = (o * do).sum() + (S * dS).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), S.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("T,C,K,V", SHAPES)
def test_chunkwise_matches_naive(kind, dtype, tol, T, C, K, V):
    x = make_inputs(kind, T, K, V, dtype, seed=T * 31 + C)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    # ground truth: the naive recurrence on float64 copies of the same inputs
    x64 = {n: (t.double() if t is not None else None) for n, t in x.items()}
    o_ref, S_ref, g_ref = forward_and_grads(kind, x64, "naive", C, do, dS)
    o, S, grads = forward_and_grads(kind, x, "torch", C, do.to(dtype), dS.to(dtype))
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel(o, o_ref) <= tol, "output"
    assert rel(S, S_ref) <= tol, "final state"
    assert set(grads) == set(g_ref)
    for name in grads:
        assert rel(grads[name], g_ref[name]) <= tol, f"grad of {name}"


@pytest.mark.parametrize("kind", MIXERS)
def test_naive_float32_matches_float64(kind):
    x = make_inputs(kind, 23, 4, 5, torch.float32, seed=3)
    o32, S32 = run(kind, x, "naive")
    o64, S64 = run(kind, {n: (t.double() if t is not None else None) for n, t in x.items()}, "naive")
    assert S32.dtype == torch.float32
    assert rel(o32, o64) < 1e-5 and rel(S32, S64) < 1e-5


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_half_inputs_keep_float32_state(backend):
    x = make_inputs("gated_delta", 19, 4, 4, torch.float16, seed=5)
    o, S = run("gated_delta", x, backend, chunk_size=8)
    assert o.dtype == torch.float16 and S.dtype == torch.float32
    o_ref, S_ref = run("gated_delta", {n: t.double() for n, t in x.items()}, "naive")
    assert rel(S, S_ref) < 1e-2 and rel(o, o_ref) < 1e-2


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_defaults_scale_and_no_initial_state(backend):
    x = make_inputs("delta", 12, 4, 4, torch.float64, seed=11)
    x["initial_state"] = None
    o, S = delta_rule(x["q"], x["k"], x["v"], x["beta"], backend=backend, chunk_size=8)
    assert S is None
    o2, _ = delta_rule(x["q"] * 0.5, x["k"], x["v"], x["beta"], scale=1.0, backend=backend,
                       chunk_size=8)
    assert rel(o, o2) < 1e-12  # default scale is K**-0.5 = 0.5 here


@pytest.mark.parametrize("kind", ["gated_delta", "gla"])
def test_strong_decay_stays_finite(kind):
    """Cumulative log-decays far below float32's range inside a chunk: no inf/nan, still matching."""
    x = make_inputs(kind, 40, 4, 4, torch.float32, seed=4)
    x["g"] = -30.0 * torch.rand(B, 40, H)
    do = torch.randn(B, 40, H, 4, dtype=torch.float64)
    dS = torch.randn(B, H, 4, 4, dtype=torch.float64)
    x64 = {n: (t.double() if t is not None else None) for n, t in x.items()}
    o_ref, S_ref, g_ref = forward_and_grads(kind, x64, "naive", 16, do, dS)
    o, S, grads = forward_and_grads(kind, x, "torch", 16, do.float(), dS.float())
    assert all(torch.isfinite(t).all() for t in [o, S, *grads.values()])
    assert rel(o, o_ref) < 1e-4 and rel(S, S_ref) < 1e-4
    for name in grads:
        assert rel(grads[name], g_ref[name]) < 1e-4, name


# ------------------------------------------------------------------------- context-parallel primitives

def kind_kwargs(kind, x):
    """g and beta as the CP primitives take them (make_inputs already left the unused one None)."""
    return dict(g=x["g"], beta=x["beta"])


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("T,C,K,V", [(37, 16, 8, 5), (16, 8, 4, 4)])
def test_shard_transition_definition(kind, backend, T, C, K, V):
    x = make_inputs(kind, T, K, V, torch.float64, seed=T + K)
    A, Bst = shard_transition(kind, x["k"], x["v"], backend=backend, chunk_size=C,
                              **kind_kwargs(kind, x))
    assert A.shape == ((B, H) if kind == "gla" else (B, H, K, K))
    assert Bst.shape == (B, H, K, V)
    # the states come from the OTHER backend: the naive Bst is naive_recurrence from zero itself
    other = "torch" if backend == "naive" else "naive"
    _, S_out = run(kind, x, other, chunk_size=C)  # from the random initial state
    assert rel(apply_transition(A, x["initial_state"]) + Bst, S_out) < 1e-10
    # Bst is the final state from zero
    _, S_zero = run(kind, x | {"initial_state": torch.zeros_like(x["initial_state"])}, other, chunk_size=C)
    assert rel(Bst, S_zero) < 1e-10


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("backend,T,C,dtype", [("naive", 37, 16, torch.float64), ("torch", 37, 16, torch.float64),
                                               ("torch", 16, 8, torch.float64), ("triton", 70, 64, torch.float32)])
def test_shard_final_state_is_the_final_state_from_the_start(kind, backend, T, C, dtype):
    """The A-free pass that CP runs where the incoming state is known: the op's final state from that
    state (and from zero), which equals A @ start + Bst of shard_transition. Triton: the interpreter,
    a ragged second chunk."""
    x = make_inputs(kind, T, 8, 5, dtype, seed=T + C)
    kw = dict(backend=backend, chunk_size=C, **kind_kwargs(kind, x))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    _, S_out = run(kind, x, "naive")
    S = shard_final_state(kind, x["k"], x["v"], initial_state=x["initial_state"], **kw)
    assert S.shape == S_out.shape and S.dtype == torch.promote_types(torch.float32, dtype)
    assert rel(S, S_out) < tol
    A, Bst = shard_transition(kind, x["k"], x["v"], **kw)
    assert rel(S, apply_transition(A, x["initial_state"].to(A.dtype)) + Bst) < tol
    assert rel(shard_final_state(kind, x["k"], x["v"], **kw), Bst) < tol


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("T,C,K,V", [(37, 16, 8, 5), (16, 8, 4, 4)])
def test_shard_state_grad_definition_and_fold(kind, backend, T, C, K, V):
    x = make_inputs(kind, T, K, V, torch.float64, seed=T * K)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS_out = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    G = shard_state_grad(kind, x["q"], x["k"], do, backend=backend, chunk_size=C,
                         **kind_kwargs(kind, x))
    s0 = x["initial_state"].clone().requires_grad_()
    o, S = run(kind, x | {"initial_state": s0}, "naive")
    G_ref, = torch.autograd.grad((o * do).sum(), s0, retain_graph=True)
    assert rel(G, G_ref) < 1e-10
    # the backward fold: dS_in = A^T dS_out + G
    A, _ = shard_transition(kind, x["k"], x["v"], backend=backend, chunk_size=C,
                            **kind_kwargs(kind, x))
    dS_in_ref, = torch.autograd.grad((o * do).sum() + (S * dS_out).sum(), s0)
    assert rel(apply_transition_transposed(A, dS_out) + G, dS_in_ref) < 1e-10


@pytest.mark.parametrize("kind", MIXERS)
def test_cp_primitives_float32_torch_vs_naive(kind):
    x = make_inputs(kind, 45, 8, 8, torch.float32, seed=2)
    do = torch.randn(B, 45, H, 8)
    kw = kind_kwargs(kind, x)
    A_n, B_n = shard_transition(kind, x["k"], x["v"], backend="naive", **kw)
    A_t, B_t = shard_transition(kind, x["k"], x["v"], backend="torch", chunk_size=16, **kw)
    assert A_t.dtype == B_t.dtype == torch.float32
    assert rel(A_t, A_n) < 1e-4 and rel(B_t, B_n) < 1e-4
    G_n = shard_state_grad(kind, x["q"], x["k"], do, backend="naive", **kw)
    G_t = shard_state_grad(kind, x["q"], x["k"], do, backend="torch", chunk_size=16, **kw)
    assert G_t.dtype == torch.float32 and rel(G_t, G_n) < 1e-4


@pytest.mark.parametrize("kind", MIXERS)
def test_two_shards_fold_to_the_whole_sequence(kind):
    x = make_inputs(kind, 40, 4, 6, torch.float64, seed=9)
    o_full, S_full = run(kind, x, "torch", chunk_size=8)
    cut = 17
    first = {n: (t[:, :cut] if t is not None and n != "initial_state" else t) for n, t in x.items()}
    second = {n: (t[:, cut:] if t is not None and n != "initial_state" else t) for n, t in x.items()}
    A0, B0 = shard_transition(kind, first["k"], first["v"], backend="torch", chunk_size=8,
                              **kind_kwargs(kind, first))
    S_mid = apply_transition(A0, x["initial_state"]) + B0
    o1, _ = run(kind, first, "torch", chunk_size=8)
    o2, S2 = run(kind, second | {"initial_state": S_mid}, "torch", chunk_size=8)
    assert rel(torch.cat([o1, o2], dim=1), o_full) < 1e-10
    assert rel(S2, S_full) < 1e-10


# ----------------------------------------------------------------------------------- dispatch/errors

def test_auto_resolves_to_torch_on_cpu():
    for op in api.OP_NAMES:
        assert api.resolve_backend("auto", op, torch.device("cpu")) == "torch"


def test_auto_prefers_triton_on_cuda_when_provided(monkeypatch):
    monkeypatch.setattr(api, "_REGISTRY", {})
    monkeypatch.setattr(api, "_triton_import", (None, "ImportError: not built"))
    cuda = torch.device("cuda")
    assert api.resolve_backend("auto", "delta_rule", cuda) == "torch"
    api.register_backend("triton", "delta_rule", lambda *a, **k: None)
    assert api.resolve_backend("auto", "delta_rule", cuda) == "triton"
    assert api.resolve_backend("auto", "gated_delta_rule", cuda) == "torch"


def test_triton_unavailable_raises(monkeypatch):
    monkeypatch.setattr(api, "_REGISTRY", {})
    monkeypatch.setattr(api, "_triton_import", (None, "ImportError: not built"))
    x = make_inputs("delta", 8, 4, 4, torch.float32)
    with pytest.raises(RuntimeError, match="triton.*unavailable"):
        delta_rule(x["q"], x["k"], x["v"], x["beta"], backend="triton")


def test_registered_backend_is_called(monkeypatch):
    monkeypatch.setattr(api, "_REGISTRY", {})
    seen = {}

    def fake(kind, k, v, *, g=None, beta=None, chunk_size=64):
        seen["args"] = (kind, chunk_size)
        return "A", "B"

    kernels.register_backend("mine", "shard_transition", fake)
    x = make_inputs("gla", 8, 4, 4, torch.float32)
    assert shard_transition("gla", x["k"], x["v"], g=x["g"], backend="mine", chunk_size=16) == ("A", "B")
    assert seen["args"] == ("gla", 16)
    with pytest.raises(RuntimeError, match="does not provide"):
        gated_linear_attn(x["q"], x["k"], x["v"], x["g"], backend="mine")
    with pytest.raises(ValueError, match="reserved"):
        kernels.register_backend("torch", "delta_rule", fake)
    with pytest.raises(ValueError, match="op_name"):
        kernels.register_backend("mine", "no_such_op", fake)


def _bad_calls():
    x = make_inputs("gated_delta", 8, 4, 4, torch.float32)
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
    return [
        (lambda: delta_rule(q[0], k, v, beta), ValueError, "q must have 4 dims"),
        (lambda: delta_rule(q, k[:, :, :, :3], v, beta), ValueError, "same shape"),
        (lambda: delta_rule(q, k, v[:, :5], beta), ValueError, r"v must be \[B, T, H, V\]"),
        (lambda: delta_rule(q, k, v, beta[:, :5]), ValueError, r"beta must be \[B, T, H\]"),
        (lambda: delta_rule(q, k, v.double(), beta), TypeError, "share one dtype"),
        (lambda: delta_rule(q, k, v, beta.long()), TypeError, "floating-point"),
        (lambda: delta_rule(q, k, v, [1.0]), TypeError, "torch.Tensor"),
        (lambda: gated_delta_rule(q, k, v, None, beta), ValueError, "g is required"),
        (lambda: delta_rule(q, k, v, beta, initial_state=torch.zeros(2, 2, 4, 5)), ValueError,
         "initial_state must be"),
        (lambda: delta_rule(q, k, v, beta, backend="cuda"), ValueError, "unknown backend"),
        (lambda: delta_rule(q, k, v, beta, chunk_size=0), ValueError, "chunk_size"),
        (lambda: delta_rule(q, k, v, beta, chunk_size=16.0), ValueError, "chunk_size"),
        (lambda: delta_rule(q, k, v, beta, chunk_size=True), ValueError, "chunk_size"),
        (lambda: delta_rule(q, k, v, beta, scale="1"), TypeError, "scale"),
        (lambda: delta_rule(q[:, :0], k[:, :0], v[:, :0], beta[:, :0]), ValueError, ">= 1"),
        (lambda: shard_transition("mamba", k, v, g=g), ValueError, "kind must be one of"),
        (lambda: shard_transition("delta", k, v, g=g, beta=beta), ValueError, "g is not used"),
        (lambda: shard_transition("gla", k, v, g=g, beta=beta), ValueError, "beta is not used"),
        (lambda: shard_state_grad("gated_delta", q, k, v[:, :3], g=g, beta=beta), ValueError,
         r"do must be \[B, T, H, V\]"),
        (lambda: apply_transition(torch.zeros(2, 2, 4), torch.zeros(2, 2, 4, 4)), ValueError, "A must be"),
    ]


@pytest.mark.parametrize("case", range(20))
def test_bad_input_gets_a_clear_error(case):
    calls = _bad_calls()
    assert len(calls) == 20
    fn, exc, pattern = calls[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_public_import_in_a_fresh_interpreter():
    code = "from lctrain.kernels import delta_rule, gated_delta_rule, gated_linear_attn"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
