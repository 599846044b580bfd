"""Deltaformer kernels: naive (token by token) = chunkwise torch = Triton (interpreter), outputs, u and
the gradients of q, k, v, beta; packed documents (cu_seqlens); input errors."""
from __future__ import annotations

import pytest
import torch
from lctrain.kernels import deltaformer

B, H, K, V = 2, 2, 16, 8


def inputs(T, dtype, seed=0, batch=B):
    """Seeded float64 draws cast to dtype (the same numbers for every dtype)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = dict(q=r(batch, T, H, K), k=r(batch, T, H, K), v=r(batch, T, H, V),
             beta=torch.rand(batch, T, H, generator=g, dtype=torch.float64))
    return {n: t.to(dtype) for n, t in x.items()}


def cotangents(x, seed=1):
    """Seeded weights (do, du) of the loss sum(o * do) + sum(u * du), float64."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x["v"].shape, generator=g, dtype=torch.float64) for _ in range(2))


def outputs_and_grads(x, cot=None, **kw):
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, u = deltaformer(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], return_u=True, **kw)
    do, du = (c.to(o.dtype) for c in (cot or cotangents(x)))
    grads = torch.autograd.grad((o * do).sum() + (u * du).sum(), list(leaves.values()), allow_unused=True,
                                materialize_grads=True)  # beta of a one-token document is unused
    return {"o": o.detach(), "u": u.detach(), **{f"d{n}": gr for n, gr in zip(leaves, grads)}}


def assert_close(got, ref, rtol):
    for name in ref:
        err = (got[name].double() - ref[name].double()).abs().max().item()
        scale = ref[name].double().abs().max().item()
        assert err <= rtol * scale, f"{name}: max error {err:.2e} vs {rtol:.0e} x {scale:.2e}"


def test_definition_by_hand():
    """Three tokens, one head, written out from the definition (no kernel code)."""
    x = inputs(3, torch.float64, seed=3, batch=1)
    k, v, b, q = x["k"][0, :, 0], x["v"][0, :, 0], x["beta"][0, :, 0], x["q"][0, :, 0]
    s = K ** -0.5
    u0 = v[0]
    u1 = v[1] - b[1] * u0
    p2 = torch.softmax(s * torch.stack([k[2] @ k[0], k[2] @ k[1]]), 0)
    u2 = v[2] - b[2] * (p2[0] * u0 + p2[1] * u1)
    U = torch.stack([u0, u1, u2])
    o2 = torch.softmax(s * (k @ q[2]), 0) @ U
    for backend in ("naive", "torch"):
        o, u = deltaformer(*x.values(), backend=backend, return_u=True)
        torch.testing.assert_close(u[0, :, 0], U)
        torch.testing.assert_close(o[0, 2, 0], o2)


@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (13, 1), (13, 64)])
def test_torch_chunks_equal_naive_float64(T, chunk):
    x = inputs(T, torch.float64, seed=T)
    ref = outputs_and_grads(x, backend="naive")
    assert_close(outputs_and_grads(x, backend="torch", chunk_size=chunk), ref, 1e-12)


@pytest.mark.parametrize("T,chunk", [(21, 8), (40, 16), (150, 80)])
def test_triton_equals_naive(T, chunk):
    """Forward statistics and backward push in Triton; (150, 80): two row blocks of 64 per chunk
    and three key blocks, partial at both ends."""
    x = inputs(T, torch.float32, seed=T)
    ref = outputs_and_grads({n: t.double() for n, t in x.items()}, backend="naive")
    assert_close(outputs_and_grads(x, backend="triton", chunk_size=chunk), ref, 2e-5)
    assert_close(outputs_and_grads(x, backend="torch", chunk_size=chunk), ref, 2e-5)


@pytest.mark.parametrize("dots", ["auto", "tf32"])
def test_triton_float16_inputs_equal_naive(dots):
    """fp16 inputs: the u-pass computes in float32 on the fp16 numbers; the read-out (SDPA) and the
    returned gradients are fp16, hence the looser tolerance. "auto" = fp16 dot operands, "tf32" =
    float32 ones (the interpreter computes those in full float32: it tests the float32 data path)."""
    x = inputs(70, torch.float16, seed=4)
    ref = outputs_and_grads({n: t.double() for n, t in x.items()}, backend="naive")
    assert_close(outputs_and_grads(x, backend="triton", chunk_size=32, kernel_dots=dots), ref, 5e-3)


def test_triton_half_dots_equal_naive():
    """kernel_dots="half": the kernels round their dot operands to fp16 (the interpreter's stand-in
    for bf16, the same code path) and accumulate in float32; fp16 inputs against float64 naive.
    Two row blocks, several key ranges and chunks (also the backward's push and key gradients).
    "auto" is the same computation for half inputs (bit for bit); "tf32" the float32-operand one."""
    x = inputs(90, torch.float16, seed=6)
    ref = outputs_and_grads({n: t.double() for n, t in x.items()}, backend="naive")
    got = outputs_and_grads(x, backend="triton", chunk_size=32, kernel_dots="half")
    assert_close(got, ref, 3e-3)
    auto = outputs_and_grads(x, backend="triton", chunk_size=32)
    assert all(torch.equal(auto[n], got[n]) for n in got), "kernel_dots='auto' on fp16 inputs is not 'half'"
    tf32 = outputs_and_grads(x, backend="triton", chunk_size=32, kernel_dots="tf32")
    assert_close(tf32, ref, 5e-3)
    assert not all(torch.equal(tf32[n], got[n]) for n in got), "kernel_dots='tf32' took the half-dot path"


@pytest.mark.parametrize("backend,dtype,dots", [("naive", torch.float32, "auto"), ("torch", torch.float32, "auto"),
                                                ("triton", torch.float32, "auto"), ("triton", torch.float16, "auto"),
                                                ("triton", torch.float16, "tf32")])
def test_cu_seqlens_is_each_document_alone(backend, dtype, dots):
    """Packed documents equal each document run alone through the naive reference in float64 (fp16:
    on the same fp16 numbers, with fp16 outputs and gradients, hence the looser tolerance)."""
    lens = [5, 1, 11]
    x = inputs(sum(lens), dtype, seed=5, batch=1)
    cu = torch.tensor([0, 5, 6, 17])
    cot = cotangents(x)
    got = outputs_and_grads(x, cot, backend=backend, chunk_size=4, cu_seqlens=cu, kernel_dots=dots)
    parts = [outputs_and_grads({n: t[:, a:b].double() for n, t in x.items()}, tuple(c[:, a:b] for c in cot),
                               backend="naive")
             for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    ref = {n: torch.cat([p[n] for p in parts], 1) for n in parts[0]}
    assert_close(got, ref, 2e-5 if dtype == torch.float32 else 5e-3)


def test_errors_name_the_argument():
    x = inputs(4, torch.float32, batch=1)
    args = list(x.values())
    with pytest.raises(ValueError, match="backend"):
        deltaformer(*args, backend="flash")
    with pytest.raises(ValueError, match="cu_seqlens"):
        deltaformer(*args, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        deltaformer(*inputs(4, torch.float32).values(), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="beta"):
        deltaformer(x["q"], x["k"], x["v"], x["beta"][..., :1])
    with pytest.raises(TypeError, match="float32"):
        deltaformer(*inputs(4, torch.float64).values(), backend="triton")
    with pytest.raises(ValueError, match="kernel_dots"):
        deltaformer(*args, kernel_dots="fp8")
    with pytest.raises(ValueError, match="kernel_dots"):
        deltaformer(*inputs(4, torch.float16).values(), backend="torch", kernel_dots="half")
    with pytest.raises(ValueError, match="kernel_dots"):
        deltaformer(*args, backend="triton", kernel_dots="half")   # float32 inputs
    with pytest.raises(ValueError, match="kernel_dots"):
        deltaformer(*inputs(4, torch.float16).values(), backend="torch", kernel_dots="tf32")
    with pytest.raises(ValueError, match="kernel_dots"):
        deltaformer(*args, backend="naive", kernel_dots="tf32")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype,dots", [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "tf32")])
def test_triton_on_cuda_equals_torch_backend(D, dtype, dots):
    """The compiled Triton u-pass (bf16 dots, the default for bf16 inputs, or TF32 ones) against the
    float32 torch backend and, at a short length, the naive recurrence: outputs and gradients."""
    g = torch.Generator().manual_seed(D)
    T, Hh = 1000, 2
    x = {n: torch.randn(1, T, Hh, D, generator=g).cuda().to(dtype) for n in ("q", "k", "v")}
    x["beta"] = torch.rand(1, T, Hh, generator=g).cuda().to(dtype)
    cot = tuple(torch.randn(1, T, Hh, D, generator=g, dtype=torch.float64).cuda() for _ in range(2))
    ref = outputs_and_grads({n: t.float() for n, t in x.items()}, cot, backend="torch", chunk_size=64)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(outputs_and_grads(x, cot, backend="triton", chunk_size=128, kernel_dots=dots), ref, tol)
    short = {n: t[:, :70].float() for n, t in x.items()}
    cot_short = tuple(c[:, :70] for c in cot)
    assert_close(outputs_and_grads(short, cot_short, backend="triton", chunk_size=32),
                 outputs_and_grads(short, cot_short, backend="naive"), 2e-3)


def test_bench_reports_why_fla_cannot_run():
    """`lctrain bench deltaformer` probes each fla method and notes the exception's text instead of
    crashing (here fla-core is not installed; on the GPU machine it is flash-attn that is missing)."""
    import importlib.util

    from lctrain.bench.deltaformer import _load_fla
    if importlib.util.find_spec("fla") is not None:
        pytest.skip("fla-core is installed here")
    notes = []
    fla = _load_fla(notes, ["fla", "fla_u_sdpa"], device="cpu")
    assert fla == {"fla": None, "fla_u_sdpa": None}
    assert "fla unavailable: ModuleNotFoundError: No module named 'fla'" in notes
    assert "fla_u_sdpa unavailable: ModuleNotFoundError: No module named 'fla'" in notes


def test_triton_cross_blocks_equal_torch():
    """The blocks context parallelism adds (rows of one rank against another rank's keys), Triton
    (interpreter) against torch: 70 rows x 80 keys, two blocks each way."""
    from lctrain.kernels.deltaformer.chunk import TORCH_STAGES
    from lctrain.kernels.deltaformer.triton_fwd import triton_stages
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    L, G, s = 70, 80, K ** -0.5
    k, u, kb, ub = r(1, H, L, K), r(1, H, L, V), r(1, H, G, K), r(1, H, G, V)
    lse, bd, bdw = 3 + r(1, H, L), r(1, H, L, V), r(1, H, L)
    lse_b, bd_b, bdw_b = 3 + r(1, H, G), r(1, H, G, V), r(1, H, G)
    out = {}
    for name, st in (("torch", TORCH_STAGES), ("triton", triton_stages())):
        m, l, acc = st.block_partials(k, kb, ub, s)
        rhs, dk, dk2 = u.clone(), k.clone(), k.clone()
        st.pull(kb, lse_b, bd_b, bdw_b, k, u, rhs, dk, s)
        st.rows_vs_keys(k, lse, bd, bdw, kb, ub, dk2, s)
        out[name] = {"lse": m + torch.log(l), "w": acc / l[..., None], "rhs": rhs, "dk pull": dk, "dk rows": dk2}
    assert_close(out["triton"], out["torch"], 1e-5)


@pytest.mark.parametrize("s,e", [(0, 7), (20, 170)])
def test_triton_chunk_solve_equals_torch(s, e):
    """The forward solve of one chunk (Triton forward substitution, interpreter) against the torch
    triangular solve: u, w and the fp16 copy of u; (20, 170): ten row blocks, three blocks of
    earlier rows for the last, a partial one at the end; (0, 7): a chunk shorter than a block."""
    from lctrain.kernels.deltaformer.chunk import torch_chunk_solve
    from lctrain.kernels.deltaformer.triton_fwd import triton_chunk_solve
    g = torch.Generator().manual_seed(e)
    T, c, Vw = 180, e - s, 40
    p = torch.rand(1, H, c, c, generator=g).tril(-1)
    p = p / p.sum(-1, keepdim=True).clamp_min(1.0)             # rows of a softmax over earlier keys
    w_prev = torch.randn(1, H, c, Vw, generator=g)
    beta, v = torch.rand(1, H, T, generator=g), torch.randn(1, H, T, Vw, generator=g)
    out = {}
    for name, fn in (("torch", torch_chunk_solve), ("triton", triton_chunk_solve)):
        u, w, uc = torch.zeros(1, H, T, Vw), torch.zeros(1, H, T, Vw), torch.zeros(1, H, T, Vw, dtype=torch.float16)
        fn(p, w_prev, beta, v, u, w, s, e, uc)
        out[name] = {"u": u, "w": w, "u copy": uc.float()}
    copies = [out[n].pop("u copy") for n in ("triton", "torch")]
    assert_close(out["triton"], out["torch"], 1e-5)
    assert_close({"u copy": copies[0]}, {"u copy": copies[1]}, 1e-3)        # an fp16 rounding apart at most
    assert out["triton"]["u"][:, :, :s].abs().sum() == 0 and out["triton"]["u"][:, :, e:].abs().sum() == 0


@pytest.mark.parametrize("s,e", [(0, 7), (20, 170)])
def test_triton_chunk_adjoint_solve_equals_torch(s, e):
    """The backward's adjoint solve of one chunk (Triton back substitution, interpreter) against the
    torch transposed triangular solve: dv and bd = beta d."""
    from lctrain.kernels.deltaformer.chunk import torch_chunk_solve_t
    from lctrain.kernels.deltaformer.triton_fwd import triton_chunk_solve_t
    g = torch.Generator().manual_seed(e + 1)
    T, c, Vw = 180, e - s, 40
    p = torch.rand(1, H, c, c, generator=g).tril(-1)
    p = p / p.sum(-1, keepdim=True).clamp_min(1.0)
    beta, rhs = torch.rand(1, H, T, generator=g), torch.randn(1, H, T, Vw, generator=g)
    out = {}
    for name, fn in (("torch", torch_chunk_solve_t), ("triton", triton_chunk_solve_t)):
        dv, bd = torch.zeros(1, H, T, Vw), torch.zeros(1, H, T, Vw)
        fn(p, beta, rhs, dv, bd, s, e)
        out[name] = {"dv": dv, "bd": bd}
    assert_close(out["triton"], out["torch"], 1e-5)
    assert out["triton"]["dv"][:, :, :s].abs().sum() == 0 and out["triton"]["dv"][:, :, e:].abs().sum() == 0
