"""Packed variable-length sequences (cu_seqlens) in the kernel ops and the CP primitives.

Every op and backend on a B=1 stream of packed documents equals running each document alone: outputs,
final states (one per document) and the gradients of every input and of every initial state. The
documents have odd lengths, some shorter than a chunk, one of a single token. Bad cu_seqlens are
refused before anything runs, with an error naming cu_seqlens.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import TRITON_DEVICES
from lctrain.kernels import (
    check_cu_seqlens,
    delta_rule,
    gated_delta_rule,
    gated_linear_attn,
    shard_state_grad,
    shard_transition,
)

MIXERS = ("delta", "gated_delta", "gla")
OPS = {"delta": delta_rule, "gated_delta": gated_delta_rule, "gla": gated_linear_attn}
LENGTHS = [5, 1, 13, 3, 20]  # chunk 8: shorter than a chunk, one token, ragged chunks
H, K, V = 2, 4, 6


def make_inputs(kind, T, dtype, seed, n_docs, device="cpu", dims=(H, K, V)):
    H, K, V = dims
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = dict(q=r(1, T, H, K), k=F.normalize(r(1, T, H, K), dim=-1), v=r(1, T, H, V),
             g=F.logsigmoid(r(1, T, H) + 2.0) if kind != "delta" else None,
             beta=torch.sigmoid(r(1, T, H)) if kind != "gla" else None,
             initial_state=r(n_docs, H, K, V))
    return {n: None if t is None else t.to(device, dtype) for n, t in x.items()}


def call(kind, x, backend, chunk, **kw):
    args = [x["q"], x["k"], x["v"]] + [x[n] for n in ("g", "beta") if x[n] is not None]
    return OPS[kind](*args, initial_state=x["initial_state"], output_final_state=True, backend=backend,
                     chunk_size=chunk, **kw)


def packed_and_alone(kind, backend, chunk, dtype, lengths, seed=0, device="cpu", dims=(H, K, V)):
    """(packed results, per-document results): (o, final states, {name: grad}) for the loss
    sum(o * do) + sum(S * dS), with the packed stream vs each document alone (naive, float64)."""
    T, N = sum(lengths), len(lengths)
    H, K, V = dims
    x = make_inputs(kind, T, dtype, seed, N, device, dims)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(1, T, H, V, generator=gen, dtype=torch.float64).to(device)
    dS = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64).to(device)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)

    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if t is not None}
    full = {n: leaves.get(n) for n in x}
    o, S = call(kind, full, backend, chunk, cu_seqlens=cu)
    loss = (o.double() * do).sum() + (S.double() * dS).sum()
    packed = (o.detach(), S.detach(), dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())))))

    ref_leaves = {n: t.detach().cpu().double().clone().requires_grad_() for n, t in x.items() if t is not None}
    do, dS = do.cpu(), dS.cpu()
    outs, finals, loss = [], [], 0.0
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):  # naive on CPU, float64
        doc = {n: None if t is None else (t[i:i + 1] if n == "initial_state" else t[:, s:e])
               for n, t in ((n, ref_leaves.get(n)) for n in x)}
        o_i, S_i = call(kind, doc, "naive", chunk)
        outs.append(o_i)
        finals.append(S_i)
        loss = loss + (o_i * do[:, s:e]).sum() + (S_i * dS[i:i + 1]).sum()
    alone = (torch.cat(outs, 1).detach(), torch.cat(finals).detach(),
             dict(zip(ref_leaves, torch.autograd.grad(loss, list(ref_leaves.values())))))
    return packed, alone


# float32 on a GPU: tl.dot takes float32 tiles as TF32 (10-bit mantissa), ~1e-3 relative (measured 1.3e-3 to
# 1.7e-3 on an H200); the interpreter computes in full float32
TF32_TOL = 5e-3


def assert_same(packed, alone, tol, what):
    rel = lambda a, b: ((a.cpu().double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()  # noqa: E731
    assert packed[0].shape == alone[0].shape and packed[1].shape == alone[1].shape
    assert rel(packed[0], alone[0]) <= tol, f"{what}: output"
    assert rel(packed[1], alone[1]) <= tol, f"{what}: final states"
    assert set(packed[2]) == set(alone[2])
    for name, g in packed[2].items():
        assert rel(g, alone[2][name]) <= tol, f"{what}: grad of {name}"


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_packed_documents_equal_each_document_alone(kind, backend):
    packed, alone = packed_and_alone(kind, backend, 8, torch.float64, LENGTHS, seed=MIXERS.index(kind))
    assert_same(packed, alone, 1e-10, f"{kind}/{backend}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_triton_packed_documents_equal_each_document_alone(kind, dtype, tol, device, monkeypatch):
    """backend="triton" runs its native varlen kernels (the per-document loop must not run):
    documents shorter than, equal to and longer than a chunk (64, the last chunk partial, odd
    lengths), and one token. In the interpreter with blocks of 16, so the state passes run two V
    blocks per document; on CUDA with the default launch settings."""
    from kernel_cases import SMALL_BLOCKS
    from lctrain.kernels import api
    from lctrain.kernels.triton import ops

    def loop(*a, **kw):
        raise AssertionError("backend='triton' with cu_seqlens fell back to the per-document loop")
    monkeypatch.setattr(api, "per_document", loop)
    # on CUDA the smallest head dim the kernels take there (ops.gpu_refusal: 16 / 20 gave wrong dq/dk on an H200)
    dims = (2, 16, 20) if device == "cpu" else (2, 32, 32)
    previous = ops.set_config(**(SMALL_BLOCKS if device == "cpu" else {}))
    try:
        packed, alone = packed_and_alone(kind, "triton", 64, dtype, [7, 1, 64, 77], seed=5,
                                         device=device, dims=dims)
    finally:
        ops.set_config(**previous)
    if device == "cuda" and dtype == torch.float32:
        tol = TF32_TOL
    assert_same(packed, alone, tol, f"{kind}/triton/{dtype} on {device}")


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU runs through the Triton interpreter (TRITON_INTERPRET=1, set by conftest)")
@pytest.mark.parametrize("kind", ["delta", "gated_delta"])
def test_triton_direct_pt_equals_each_document_alone(kind):
    """Launch key direct_pt=1 (dq/dk: dk's P^T as its own product U dO^T instead of tl.trans of P, the
    default for float16) in float32: the same results as each document alone; float16 gets it by default,
    other dtypes do not."""
    from lctrain.kernels.triton import ops
    assert ops._Cfg(16, 20, fp16=True).direct_pt == 1 and "direct_pt" not in ops._Cfg(16, 20).values
    with pytest.raises(ValueError, match="direct_pt=2 must be 0 or 1"):
        ops.set_config(direct_pt=2)
    previous = ops.set_config(direct_pt=1)
    try:
        packed, alone = packed_and_alone(kind, "triton", 64, torch.float32, [7, 1, 64, 77], seed=5,
                                         dims=(2, 16, 20))
    finally:
        ops.set_config(**previous)
    assert_same(packed, alone, 1e-4, f"{kind}/triton direct_pt=1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", MIXERS)
def test_small_head_dims_are_refused_on_gpu(kind, dtype):
    """Head dims 16 / 20 gave wrong dq / dk on an H200 in every dtype and launch setting tried (kernel_check,
    docs/kernels-notes.md): on CUDA the op refuses them before any kernel runs, naming the head dims."""
    with pytest.raises(ValueError, match="head dims below 32"):
        packed_and_alone(kind, "triton", 64, dtype, [7, 1, 64, 77], seed=5, device="cuda", dims=(2, 16, 20))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", MIXERS)
def test_triton_packed_documents_with_wide_state_blocks(kind, device, monkeypatch):
    """Many documents widen the state passes' V blocks (ops._wide_state_block); here the threshold
    is lowered so that 4 documents get them: one 64-wide block per document and head, whatever the
    defaults for one sequence, and the result still equals each document alone."""
    from lctrain.kernels.triton import ops
    monkeypatch.setattr(ops, "WIDE_STATE_PROGRAMS", 1)
    seen = []
    real = ops._state_fwd

    def spy(*a, **kw):
        seen.append((a[5].BVS, a[5].BVSB))
        return real(*a, **kw)
    monkeypatch.setattr(ops, "_state_fwd", spy)
    packed, alone = packed_and_alone(kind, "triton", 64, torch.float32, [7, 1, 64, 77], seed=6,
                                     device=device, dims=(2, 16, 64))
    assert seen and set(seen) == {(64, 64)}
    assert_same(packed, alone, TF32_TOL if device == "cuda" else 1e-4, f"{kind}/triton wide state blocks on {device}")
    assert ops._Cfg(128, 128, chains=1024).BVS == 64 and ops._Cfg(128, 128, chains=None).BVS == 16


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU runs through the Triton interpreter (TRITON_INTERPRET=1, set by conftest)")
@pytest.mark.parametrize("kind", ["gated_delta", "gla"])
def test_triton_varlen_is_bitwise_each_document_alone(kind):
    """Without initial or final state, int64 boundaries: the native varlen kernels give bit for bit
    the outputs and gradients of the ordinary Triton kernels run on each document alone (the same
    chunks, the same arithmetic)."""
    from lctrain.kernels import api

    x = make_inputs(kind, 94, torch.float32, 7, 4, dims=(2, 16, 16))
    cu = torch.tensor([0, 3, 73, 74, 94])
    gen = torch.Generator().manual_seed(8)
    do = torch.randn(1, 94, 2, 16, generator=gen)
    names = ["q", "k", "v"] + [n for n in ("g", "beta") if x[n] is not None]

    def run(packed):
        leaves = [x[n].clone().requires_grad_() for n in names]
        op = lambda q, k, v, g, beta, **kw: OPS[kind](  # noqa: E731
            q, k, v, *[t for t in (g, beta) if t is not None], backend="triton", **kw)
        lv = dict(zip(names, leaves))
        args = (lv["q"], lv["k"], lv["v"], lv.get("g"), lv.get("beta"))
        if packed:
            o, S = op(*args, cu_seqlens=cu)
        else:
            o, S = api.per_document(op, cu.tolist(), *args)
        assert S is None
        return [o] + list(torch.autograd.grad((o * do).sum(), leaves))
    for name, a, b in zip(["o"] + names, run(True), run(False)):
        assert torch.equal(a, b), f"{kind}: {name} differs"


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cp_primitives_with_cu_seqlens(kind, backend):
    """shard_transition: the (A, B) of the last document piece; shard_state_grad: the first piece's
    gradient of the incoming state; the torch (float64, chunk 4) and triton (float32, chunk 64,
    interpreter on CPU) backends equal naive on the slices."""
    if backend == "triton" and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("Triton runs on CPU through the interpreter; tests/test_kernels_gpu.py covers CUDA")
    dtype, chunk, tol = (torch.float64, 4, {}) if backend == "torch" else \
        (torch.float32, 64, dict(rtol=1e-4, atol=1e-5))
    x = make_inputs(kind, 21, dtype, 3, 3)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(1, 21, H, V, generator=gen, dtype=torch.float64).to(dtype)
    cu = torch.tensor([0, 6, 9, 21])
    gates = {n: x[n] for n in ("g", "beta")}
    A, Bst = shard_transition(kind, x["k"], x["v"], **gates, backend=backend, chunk_size=chunk,
                              cu_seqlens=cu)
    A_ref, B_ref = shard_transition(kind, x["k"][:, 9:], x["v"][:, 9:], backend="naive",
                                    **{n: None if t is None else t[:, 9:] for n, t in gates.items()})
    torch.testing.assert_close(A, A_ref.to(A.dtype), **tol)
    torch.testing.assert_close(Bst, B_ref.to(Bst.dtype), **tol)
    G = shard_state_grad(kind, x["q"], x["k"], do, **gates, backend=backend, chunk_size=chunk,
                         cu_seqlens=cu)
    G_ref = shard_state_grad(kind, x["q"][:, :6], x["k"][:, :6], do[:, :6], backend="naive",
                             **{n: None if t is None else t[:, :6] for n, t in gates.items()})
    torch.testing.assert_close(G, G_ref.to(G.dtype), **tol)


@pytest.mark.parametrize("cu,batch,error,match", [
    ([1, 4, 9], 1, ValueError, "start at 0"),
    ([0, 4, 4, 9], 1, ValueError, "strictly increasing"),
    ([0, 6, 4, 9], 1, ValueError, "strictly increasing"),
    ([0, 4, 8], 1, ValueError, "end at the sequence length T=9"),
    ([0, 4, 9], 2, ValueError, "batch size 1"),
    ([0.0, 4.0, 9.0], 1, TypeError, "int32 or int64"),
    ([[0, 4, 9]], 1, ValueError, r"1-D \[N\+1\]"),
    ([9], 1, ValueError, r"1-D \[N\+1\]"),
])
def test_bad_cu_seqlens_is_refused_naming_it(cu, batch, error, match):
    q = torch.randn(batch, 9, H, K)
    beta = torch.rand(batch, 9, H)
    with pytest.raises(error, match=match) as info:
        delta_rule(q, q, q, beta, cu_seqlens=torch.tensor(cu), backend="torch")
    assert "cu_seqlens" in str(info.value)


def test_cu_seqlens_device_and_initial_state_rows_are_checked():
    q, beta = torch.randn(1, 9, H, K), torch.rand(1, 9, H)
    with pytest.raises(ValueError, match="cu_seqlens is on meta"):
        check_cu_seqlens(torch.tensor([0, 9], device="meta"), 1, 9, q.device)
    with pytest.raises(ValueError, match=r"initial_state must be \[N \(one per document of cu_seqlens\)"):
        delta_rule(q, q, q, beta, cu_seqlens=torch.tensor([0, 4, 9]), initial_state=torch.zeros(1, H, K, K))
    with pytest.raises(ValueError, match="cu_seqlens"):
        shard_transition("delta", q, q, beta=beta, cu_seqlens=torch.tensor([0, 5]))
    assert check_cu_seqlens(torch.tensor([0, 4, 9], dtype=torch.int32), 1, 9, q.device) == [0, 4, 9]


def test_remembered_cu_seqlens_are_checked_again_where_the_call_differs():
    """The boundaries are read and checked once per tensor (not per layer call); a call with another
    T is still refused, and an in-place change is read and checked anew."""
    cu = torch.tensor([0, 4, 9])
    first = check_cu_seqlens(cu, 1, 9, cu.device)
    assert check_cu_seqlens(cu, 1, 9, cu.device) is first
    with pytest.raises(ValueError, match="cu_seqlens must end at the sequence length T=8"):
        check_cu_seqlens(cu, 1, 8, cu.device)
    cu[1] = 0
    with pytest.raises(ValueError, match="cu_seqlens must be strictly increasing"):
        check_cu_seqlens(cu, 1, 9, cu.device)


def test_gpu_refusal_names_the_shapes_the_triton_kernels_got_wrong_on_a_gpu():
    """ops.gpu_refusal (checked by every op on CUDA inputs and by the trainer): head dims below 32 in any dtype,
    float32 above 64; bfloat16 / float16 from 32 up and float32 up to 64 pass (kernel_check, H200)."""
    from lctrain.kernels.triton.ops import gpu_refusal
    for K, V in ((16, 20), (16, 64), (64, 20)):
        assert "head dims below 32" in gpu_refusal(K, V, torch.bfloat16)
    assert "float32 inputs at head dims above 64" in gpu_refusal(128, 128, torch.float32)
    for K, dtype in ((32, torch.bfloat16), (64, torch.float32), (128, torch.bfloat16), (128, torch.float16),
                     (256, torch.bfloat16)):
        assert gpu_refusal(K, K, dtype) is None, (K, dtype)
