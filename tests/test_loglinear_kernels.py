"""Log-linear Gated DeltaNet / Mamba-2 ops: naive (Fenwick recurrence) = dense (masked T x T form) =
torch (per-level base-op runs) = triton_composed (the same runs on the Triton base kernels) = triton (the
fused kernels; both in the interpreter), in outputs, final level states and every gradient; lambda = 1
gives the plain op; input errors."""
import os

import pytest
import torch
import torch.nn.functional as F
from lctrain.kernels import (
    gated_delta_rule,
    gated_linear_attn,
    levels_needed,
    loglinear_gated_delta_rule,
    loglinear_gated_linear_attn,
)
from lctrain.kernels.loglinear import level
from lctrain.kernels.loglinear.scalar_tree import tree_levels

KINDS = ("gdn", "mamba2")
B, H = 1, 2


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(kind, T, K, V, L, dtype, seed, p0=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = dict(q=r(B, T, H, K), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V),
             g=F.logsigmoid(r(B, T, H) + 2.0),
             beta=torch.sigmoid(r(B, T, H)) if kind == "gdn" else None,
             lam=F.softplus(r(B, T, H, L)),
             init=r(B, H, L, K, V) if p0 else None)
    gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return {n: (None if t is None else t.to(dtype if n in ("q", "k", "v") else gate_dtype))
            for n, t in x.items()}


def call(kind, x, backend, p0=0, chunk_size=8, final=True):
    kw = dict(initial_state=x["init"], output_final_state=final, position_offset=p0, backend=backend,
              chunk_size=chunk_size)
    if kind == "gdn":
        return loglinear_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], x["lam"], **kw)
    return loglinear_gated_linear_attn(x["q"], x["k"], x["v"], x["g"], x["lam"], **kw)


def outputs_and_grads(kind, x, backend, p0, do, dS, chunk_size=8):
    """(o, final state or None, {input: gradient}) of sum(o do) + sum(S dS); dS None: no final state asked."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if t is not None}
    o, S = call(kind, {**{n: None for n in x}, **leaves}, backend, p0, chunk_size, final=dS is not None)
    loss = (o.double() * do).sum() + (0 if dS is None else (S.double() * dS).sum())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), None if S is None else S.detach(), dict(zip(leaves, grads))


def test_level_definition():
    assert level(5, 5) == 0 and level(5, 4) == 1 and level(5, 3) == 3 and level(5, 0) == 3
    assert level(4, 3) == 3 and level(8, 7) == 4
    assert levels_needed(1) == 1 and levels_needed(2) == 2 and levels_needed(37) == 7 and levels_needed(64) == 7
    # query t has one bucket of 2^(l-1) tokens at each set bit l-1 of t
    for t in (37, 64, 100):
        counts = {}
        for s in range(t):
            counts[level(t, s)] = counts.get(level(t, s), 0) + 1
        assert counts == {b + 1: 1 << b for b in range(t.bit_length()) if t >> b & 1}


# (T, p0, chunk): T not a power of two and at powers of two; p0 > 0 carries an initial state (levels of
# query p0-1) and, off a chunk boundary, a head call; T=5: every level inside one chunk; chunk 6 (not a
# power of two): every level as its own run
CASES = [(37, 0, 8), (100, 0, 8), (32, 0, 8), (64, 0, 8), (37, 5, 8), (20, 16, 8), (5, 0, 8), (30, 3, 6)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,p0,chunk", CASES)
def test_naive_dense_torch_agree_with_every_gradient(kind, T, p0, chunk):
    K, V = 4, 3
    L = levels_needed(p0 + T) + 1  # one level more than any query uses
    x = make_inputs(kind, T, K, V, L, torch.float64, seed=T + p0, p0=p0)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, L, K, V, generator=gen, dtype=torch.float64)
    ref = outputs_and_grads(kind, x, "naive", p0, do, dS)
    for backend in ("dense", "torch"):
        o, S, g = outputs_and_grads(kind, x, backend, p0, do, dS, chunk_size=chunk)
        assert rel(o, ref[0]) < 1e-10 and rel(S, ref[1]) < 1e-10, backend
        for name in ref[2]:
            assert rel(g[name], ref[2][name]) < 1e-10, (backend, name)
    # a level no query reaches gets exactly zero gradient; the others do not
    assert ref[2]["lam"][..., L - 1].abs().max() == 0
    assert ref[2]["lam"][..., : L - 1].abs().amax(dim=(0, 1, 2)).min() > 0
    if p0:  # initial slots above bit_length(p0 - 1) cannot hold anything: ignored
        reach = (p0 - 1).bit_length()
        assert ref[2]["init"][:, :, reach + 1:].abs().max() == 0
        assert ref[2]["init"][:, :, : reach + 1].abs().amax(dim=(0, 1, 3, 4)).min() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_unit_level_weights_give_the_plain_op(kind, backend):
    T, K, V, p0 = 45, 4, 5, 11
    L = levels_needed(p0 + T)
    x = make_inputs(kind, T, K, V, L, torch.float64, seed=3, p0=p0)
    x["lam"] = torch.ones_like(x["lam"])
    o, S = call(kind, x, backend, p0)
    reach = (p0 - 1).bit_length()  # the slots an initial state can have
    plain = dict(initial_state=x["init"][:, :, : reach + 1].sum(dim=2), output_final_state=True, backend="naive")
    if kind == "gdn":
        o_ref, S_ref = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **plain)
    else:
        o_ref, S_ref = gated_linear_attn(x["q"], x["k"], x["v"], x["g"], **plain)
    assert rel(o, o_ref) < 1e-12 and rel(S.sum(dim=2), S_ref) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_torch_float32_and_float16(kind):
    T, K, V = 40, 8, 8
    L = levels_needed(T)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
        x = make_inputs(kind, T, K, V, L, dtype, seed=4)
        do = torch.randn(B, T, H, V, dtype=torch.float64)
        dS = torch.randn(B, H, L, K, V, dtype=torch.float64)
        x64 = {n: (t.double() if t is not None else None) for n, t in x.items()}
        ref = outputs_and_grads(kind, x64, "naive", 0, do, dS)
        o, S, g = outputs_and_grads(kind, x, "torch", 0, do, dS, chunk_size=16)
        assert o.dtype == dtype and S.dtype == torch.float32
        assert rel(o, ref[0]) < tol and rel(S, ref[1]) < tol
        for name in ref[2]:
            assert rel(g[name], ref[2][name]) < tol, (dtype, name)


@pytest.mark.parametrize("kind", KINDS)
def test_cu_seqlens_runs_every_document_from_position_zero(kind):
    bounds = [0, 5, 21, 37]
    T, K, V, L = 37, 4, 3, levels_needed(16) + 1
    x = make_inputs(kind, T, K, V, L, torch.float64, seed=12)
    cu = torch.tensor(bounds)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    kw = dict(output_final_state=True, backend="torch", chunk_size=4, cu_seqlens=cu)
    if kind == "gdn":
        o, S = loglinear_gated_delta_rule(*(leaves[n] for n in ("q", "k", "v", "g", "beta", "lam")), **kw)
    else:
        o, S = loglinear_gated_linear_attn(*(leaves[n] for n in ("q", "k", "v", "g", "lam")), **kw)
    assert S.shape == (3, H, L, K, V)
    grads = torch.autograd.grad(o.square().sum() + S.sum(), list(leaves.values()))
    ref_leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    loss = 0.0
    for i, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
        doc = {**{n: None for n in x}, **{n: t[:, bos:eos] for n, t in ref_leaves.items()}}
        o_ref, S_ref = call(kind, doc, "naive")
        assert rel(o[:, bos:eos], o_ref) < 1e-10 and rel(S[i:i + 1], S_ref) < 1e-10
        loss = loss + o_ref.square().sum() + S_ref.sum()
    ref_grads = torch.autograd.grad(loss, list(ref_leaves.values()))
    for name, got, want in zip(leaves, grads, ref_grads):
        assert rel(got, want) < 1e-10, name


def test_decoding_one_token_at_a_time_equals_one_call():
    T, K, V = 21, 4, 4
    L = levels_needed(T)
    x = make_inputs("gdn", T, K, V, L, torch.float64, seed=8)
    o_full, S_full = call("gdn", x, "torch")
    state, outs = None, []
    for t in range(T):
        step = {n: (v[:, t:t + 1] if v is not None and n != "init" else None) for n, v in x.items()}
        o, state = call("gdn", {**step, "init": state}, "naive", p0=t)
        outs.append(o)
    assert rel(torch.cat(outs, dim=1), o_full) < 1e-12 and rel(state, S_full) < 1e-12


needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU runs)")


@needs_triton
@pytest.mark.parametrize("backend,kind,T,p0,dtype,tol", [
    ("triton_composed", "gdn", 100, 0, torch.float32, 1e-4),
    ("triton_composed", "mamba2", 72, 60, torch.float16, 1e-2),
    ("triton", "gdn", 200, 0, torch.float32, 1e-4),
    ("triton", "mamba2", 200, 0, torch.float32, 1e-4),
    ("triton", "gdn", 250, 70, torch.float32, 1e-4),
    ("triton", "mamba2", 150, 128, torch.float16, 1e-2),
    ("triton", "mamba2", 300, 0, torch.float16, 1e-2),
    ("triton", "gdn", 40, 0, torch.float32, 1e-4)])
def test_triton_matches_naive(backend, kind, T, p0, dtype, tol):
    """triton_composed: the levels above log2(64) run the Triton base kernels (forward and backward); the
    unaligned start p0=60 also runs a short head call level by level. triton (fused): T=200 has two levels
    (7, 8) in the level kernels (ragged last chunk); p0=70 carries an initial state into them after a head call of
    58 tokens; p0=128 starts the level-8 block mid-way (its run state comes from the initial state) while
    level 7's starts fresh; T=40: no level above the chunk."""
    K, V = 16, 16
    L = levels_needed(p0 + T)
    x = make_inputs(kind, T, K, V, L, dtype, seed=T, p0=p0)
    do = torch.randn(B, T, H, V, dtype=torch.float64)
    dS = torch.randn(B, H, L, K, V, dtype=torch.float64)
    x64 = {n: (t.double() if t is not None else None) for n, t in x.items()}
    ref = outputs_and_grads(kind, x64, "naive", p0, do, dS)
    o, S, g = outputs_and_grads(kind, x, backend, p0, do, dS, chunk_size=64)
    assert o.dtype == dtype
    assert rel(o, ref[0]) < tol and rel(S, ref[1]) < tol
    for name in ref[2]:
        assert rel(g[name], ref[2][name]) < tol, name


@needs_triton
@pytest.mark.parametrize("budget,cfg", [(1, {"LP": 1, "BV": 16}), (None, {"LP": 1, "ATOMIC": 0}),
                                        (None, {"LP": 4, "ATOMIC": 0})])
def test_fused_triton_level_groups_change_nothing(monkeypatch, budget, cfg):
    """Same outputs and gradients as the defaults (one group, 2 levels per program, V blocks of 32, the
    readouts summed with atomics) when the backward recomputes the level states in groups (one level per
    group; budget 1 byte: also in segments of one chunk, see the next test) and the scans run one level per
    program in V blocks of 16; when every level's readout goes to its own output slice (no atomics); and
    with 4 levels per program (2 of them padding)."""
    from lctrain.kernels.loglinear import triton_levels
    T, K, V = 200, 16, 16
    L = levels_needed(T)
    x = make_inputs("gdn", T, K, V, L, torch.float32, seed=5)
    do, dS = torch.randn(B, T, H, V, dtype=torch.float64), torch.randn(B, H, L, K, V, dtype=torch.float64)
    whole = outputs_and_grads("gdn", x, "triton", 0, do, dS, chunk_size=64)
    if budget is not None:
        monkeypatch.setattr(triton_levels, "STATE_BUDGET", budget)
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, **cfg})
    parts = outputs_and_grads("gdn", x, "triton", 0, do, dS, chunk_size=64)
    assert rel(parts[0], whole[0]) < 1e-6 and rel(parts[1], whole[1]) < 1e-6
    for name in whole[2]:
        assert rel(parts[2][name], whole[2][name]) < 1e-6, name


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_fused_triton_backward_in_segments_changes_nothing(monkeypatch, kind):
    """Where h and dh of one group of levels over the whole sequence would pass STATE_BUDGET (1M tokens at
    H=16, D=128) the backward runs segment by segment from the last, each from the run states the forward
    stored at its start and ending on the next one's incoming-state gradient. Here segments of 2 chunks
    (a budget of 2 levels x 2 chunks of h and dh), B=2 (one batch row at a time), T=300 from position 128
    with an initial state and the final states (3 segments, the last ragged; levels 7, 8, 9: the level-8
    and level-9 blocks continue across the segment starts at tokens 256 and 384 of the sequence, level 7's
    do not): the same outputs, final states and gradients (every input and the initial state) as in one
    segment."""
    from lctrain.kernels.loglinear import triton_levels
    gen = torch.Generator().manual_seed(31)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    Bt, T, p0, K, V = 2, 300, 128, 16, 16
    L = levels_needed(p0 + T)
    x = [r(Bt, T, H, K), F.normalize(r(Bt, T, H, K), dim=-1), r(Bt, T, H, V), F.logsigmoid(r(Bt, T, H) + 2.0),
         torch.sigmoid(r(Bt, T, H)), F.softplus(r(Bt, T, H, L)), r(Bt, H, L, K, V)]
    if kind == "mamba2":
        del x[4]
    do, dS = r(Bt, T, H, V), r(Bt, H, L, K, V)
    op = loglinear_gated_delta_rule if kind == "gdn" else loglinear_gated_linear_attn

    def run():
        leaves = [t.clone().requires_grad_() for t in x]
        o, S = op(*leaves[:-1], initial_state=leaves[-1], output_final_state=True, position_offset=p0,
                  backend="triton")
        return o, S, torch.autograd.grad((o * do).sum() + (S * dS).sum(), leaves)

    seen = []
    plan = triton_levels.backward_plan
    monkeypatch.setattr(triton_levels, "backward_plan", lambda *a: seen.append(plan(*a)) or plan(*a))
    one = run()
    assert seen[-1] == (3, 5)                               # one group of the 3 levels, one segment of 5 chunks
    monkeypatch.setattr(triton_levels, "STATE_BUDGET", 2 * 2 * (2 * Bt * H * K * V * 4))
    parts = run()
    assert seen[-1] == (2, 2)
    for name, a, b in zip(["o", "S", "dq", "dk", "dv", "dg"] + (["dbeta"] if kind == "gdn" else []) + ["dlam", "dS0"],
                          one[:2] + one[2], parts[:2] + parts[2]):
        assert rel(b, a) < 1e-6, name


class Launches:
    """A Triton kernel stand-in that counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_kept_level_states_skip_the_recompute_and_change_nothing(monkeypatch, kind):
    """KEEP_H=1: the training forward stores every level's per-chunk states and the backward uses them
    instead of running the forward scan again (one launch fewer), also where it works in groups of levels
    (each reads its slice); outputs, final states and every gradient are those of the recompute (the same
    scan stores the same states). T=300 from position 128 with an initial state: levels continuing into the
    call, 3 levels above the chunk over 5 chunks. Where the backward has to cut the sequence into segments,
    nothing is kept (with a warning) and it recomputes (per group and segment), with the same results."""
    from lctrain.kernels.loglinear import triton_levels
    T, K, V, p0 = 300, 16, 16, 128
    L = levels_needed(p0 + T)
    x = make_inputs(kind, T, K, V, L, torch.float32, seed=13, p0=p0)
    do, dS = torch.randn(B, T, H, V, dtype=torch.float64), torch.randn(B, H, L, K, V, dtype=torch.float64)
    scans = Launches(triton_levels.levels_fwd_kernel)
    monkeypatch.setattr(triton_levels, "levels_fwd_kernel", scans)
    plans = []
    plan = triton_levels.backward_plan
    monkeypatch.setattr(triton_levels, "backward_plan", lambda *a: plans.append(plan(*a)) or plan(*a))
    level = B * 5 * H * K * V * 4                  # bytes of h (or dh) of one level over the 5 chunks, fp32
    cases = {"recompute": (0, None, (3, 5), 2), "kept": (1, None, (3, 5), 1),
             "kept, 2 groups": (1, 6 * level - 1, (2, 5), 1),     # h of 3 levels fits, h and dh of 3 do not
             "segments": (1, 2 * 2 * (2 * B * H * K * V * 4), (2, 2), None)}
    runs = {}
    for name, (keep, budget, want_plan, launches) in cases.items():
        monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, "KEEP_H": keep})
        monkeypatch.setattr(triton_levels, "STATE_BUDGET", budget or 16 << 30)
        before = scans.count
        if name == "segments":   # KEEP_H=1 that cannot be kept says so
            with pytest.warns(UserWarning, match="KEEP_H=1.*recomputes"):
                runs[name] = outputs_and_grads(kind, x, "triton", p0, do, dS, chunk_size=64)
        else:
            runs[name] = outputs_and_grads(kind, x, "triton", p0, do, dS, chunk_size=64)
        assert plans[-1] == want_plan, name
        count = scans.count - before
        assert count == launches if launches else count > 2, (name, count)
    ref = runs["recompute"]
    for name, got in runs.items():
        assert rel(got[0], ref[0]) < 1e-6 and rel(got[1], ref[1]) < 1e-6, name
        for grad in ref[2]:
            assert rel(got[2][grad], ref[2][grad]) < 1e-6, (name, grad)


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_block_totals_match_the_level_scans(monkeypatch, kind):
    """Calls from position 0 take their levels above the chunk from trees of block totals (Mamba-2 with
    SCALAR_TREE=1: scalar_tree; Gated DeltaNet with TREE=1, the default: transition_tree's tree of chunk maps
    in Triton, forward and backward, checked to run); the level scans (0) give the same outputs, final states
    and gradients,
    also without final states (the tree one level lower) and with KEEP_H (the forward's tree kept for the
    backward). T=300: 5 chunks padded to 8, a ragged last chunk, 3 levels above the chunk; slow decays, so
    the levels above the chunk are not lost beside the ones inside it."""
    from lctrain.kernels.loglinear import fused, transition_tree, triton_levels
    T, K, V = 300, 16, 16
    L = levels_needed(T)
    x = make_inputs(kind, T, K, V, L, torch.float32, seed=9)
    x["g"] = x["g"] * 0.02   # slow decays (~0.997 a token): the levels above the chunk weigh in every result
    do, dS = torch.randn(B, T, H, V, dtype=torch.float64), torch.randn(B, H, L, K, V, dtype=torch.float64)
    calls = []
    if kind == "mamba2":
        monkeypatch.setattr(fused, "tree_levels", lambda *a, **kw: calls.append(1) or tree_levels(*a, **kw))
    else:
        def counted(f):
            return lambda *a, **kw: calls.append(1) or f(*a, **kw)
        for name in ("tree_forward", "tree_backward"):
            monkeypatch.setattr(fused, name, counted(getattr(transition_tree, name)))

    def without_final_states():  # the tree then stops a level lower
        leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if t is not None}
        o, _ = call(kind, {**{n: None for n in x}, **leaves}, "triton", 0, 64, final=False)
        return o.detach(), torch.autograd.grad((o.double() * do).sum(), list(leaves.values()))

    key = "SCALAR_TREE" if kind == "mamba2" else "TREE"
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, key: 1})
    tree, tree_o = outputs_and_grads(kind, x, "triton", 0, do, dS, chunk_size=64), without_final_states()
    want = len(calls)
    assert want == (2 if kind == "mamba2" else 4)
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, key: 0})
    scans, scans_o = outputs_and_grads(kind, x, "triton", 0, do, dS, chunk_size=64), without_final_states()
    assert len(calls) == want
    assert rel(tree[0], scans[0]) < 1e-5 and rel(tree[1], scans[1]) < 1e-5
    for name in scans[2]:
        assert rel(tree[2][name], scans[2][name]) < 1e-5, name
    assert rel(tree_o[0], scans_o[0]) < 1e-5
    for got, ref in zip(tree_o[1], scans_o[1]):
        assert rel(got, ref) < 1e-5
    if kind == "gdn":   # KEEP_H: the backward takes the forward's tree and queries instead of forming them again
        from lctrain.kernels.loglinear import triton_tree
        builds = []
        monkeypatch.setattr(triton_tree, "build_tree", lambda *a, f=triton_tree.build_tree: builds.append(1) or f(*a))
        monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, "TREE": 1, "KEEP_H": 1})
        kept = outputs_and_grads(kind, x, "triton", 0, do, dS, chunk_size=64)
        assert len(builds) == 1
        assert rel(kept[0], scans[0]) < 1e-5 and rel(kept[1], scans[1]) < 1e-5
        for name in scans[2]:
            assert rel(kept[2][name], scans[2][name]) < 1e-5, name


@needs_triton
@pytest.mark.parametrize("T,p0,keep,final", [(256, 256, 0, True), (200, 512, 1, True), (256, 768, 0, False)])
def test_transition_tree_from_incoming_states_matches_the_level_scans(monkeypatch, T, p0, keep, final):
    """A call from an aligned block with incoming states (a CP rank's shard) takes the transition tree too: the
    levels inside the call from its buckets, the levels whose block began before it through the query carried
    across all of them (tree_serves). Against the level scans (TREE=0): outputs, final states and every
    gradient, the initial state's included. (256, 256): 4 chunks from chunk 4, the level of 8 chunks
    continues a block; (200, 512): a ragged last chunk, the 8-chunk level starts afresh at the call (its
    incoming state unread) and the 16-chunk one continues, with KEEP_H (the forward's tree kept); (256, 768): the
    8- and the 16-chunk levels both continue blocks (an incoming level below the top one: its weight is a
    difference of two level weights), and no final state asked (the tree's gradient buffers then start
    unfilled, ``triton_tree._seeded``)."""
    from lctrain.kernels.loglinear import fused, transition_tree, triton_levels
    K, V = 16, 16
    L = levels_needed(p0 + T)
    x = make_inputs("gdn", T, K, V, L, torch.float32, seed=T + p0, p0=p0)
    x["g"] = x["g"] * 0.02   # slow decays (~0.997 a token): the levels above the chunk weigh in every result
    do, dS = torch.randn(B, T, H, V, dtype=torch.float64), torch.randn(B, H, L, K, V, dtype=torch.float64)
    dS = dS if final else None
    calls = []
    monkeypatch.setattr(fused, "tree_forward",
                        lambda *a, **kw: calls.append(1) or transition_tree.tree_forward(*a, **kw))
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, "TREE": 1, "KEEP_H": keep})
    tree = outputs_and_grads("gdn", x, "triton", p0, do, dS, chunk_size=64)
    assert len(calls) == 1
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, "TREE": 0})
    scans = outputs_and_grads("gdn", x, "triton", p0, do, dS, chunk_size=64)
    assert len(calls) == 1
    assert rel(tree[0], scans[0]) < 1e-5
    for lev in range(L if final else 0):   # each level's state apart (they differ in size by orders of magnitude)
        assert (tree[1][:, :, lev] - scans[1][:, :, lev]).norm() <= 1e-5 * scans[1].norm(), lev
    for name in scans[2]:
        assert rel(tree[2][name], scans[2][name]) < 1e-5, name


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_incoming_state_grads_kernel_matches_torch(dtype, tol):
    """``triton_tree.incoming_state_grads`` (the tree backward's dS_in,j = sum_t (scale w_j qlast_t)^T dO_t, w_j =
    lam[j] - lam[j + 1], the last level's lam[j] alone) against its torch form, on level weights that are a slice of
    a wider [B, T, H, L] (row stride), two incoming levels (the top one and one below it), B=2, and T=837: a ragged
    last chunk, cut into segments of 192 rows (5 segments, the last one short)."""
    from lctrain.kernels.loglinear import triton_tree
    from lctrain.kernels.loglinear.transition_tree import _incoming_state_grads
    gen = torch.Generator().manual_seed(41)
    B, T, H, K, V, L = 2, 837, 3, 16, 32, 9
    qlast = torch.randn(B, T, H, K, generator=gen).to(dtype)
    do = torch.randn(B, T, H, V, generator=gen).to(dtype)
    lam = torch.rand(B, T, H, L, generator=gen)[..., 4:]   # the levels above the chunk: a view, row stride 9
    levels = [2, 4]
    got = triton_tree.incoming_state_grads(qlast, lam, levels, 0.3, do, rows=192)
    want = _incoming_state_grads(qlast, lam, levels, 0.3, do, dtype)
    assert set(got) == set(levels)
    for j in levels:
        assert got[j].shape == (B, H, K, V) and got[j].dtype == torch.float32
        assert rel(got[j], want[j]) < tol, (j, rel(got[j], want[j]))


@needs_triton
@pytest.mark.parametrize("T,final,hoist,subtree", [(837, True, 1, (0, 0, 1)), (837, False, 1, (2, 3, 1)),
                                                   (1024, True, 1, (6, 6, 1)), (100, False, 1, (3, 2, 2)),
                                                   (837, False, 0, (0, 0, 2)), (837, True, 1, (1, 2, 2)),
                                                   (1024, True, 1, (1, 1, 2))])
def test_transition_tree_readout_kernels_match_autograd(monkeypatch, T, final, hoist, subtree):
    """The Triton readout of the transition tree (forward, backward, per-node sums) against torch autograd of
    the torch reference (transition_tree_levels) on unstructured random inputs: W not a WY term, so the
    chunk maps are far from symmetric and every transpose counts. T=837: 14 chunks padded to 16 (4 levels
    above the chunk, chunks with up to 3 buckets); T=1024: a complete top block (final states from the tree's
    root); T=100: one level, no level above it (the chunks' gradients need no parent's share). hoist=0: the readout
    kernels load N where the query is carried, not beside Tot (CONFIG["HOIST"]). subtree: the tree levels taken in
    the launch of level 0, forward and backward (CONFIG["SUBTREE"], ["SUBTREE_BWD"]; 6, and 3 or 2 at T=100: more
    than the tree has, so all of them), and the levels a launch above (["SUBTREE_UP"])."""
    from lctrain.kernels.loglinear import triton_levels
    from lctrain.kernels.loglinear.transition_tree import (
        transition_tree_backward,
        transition_tree_levels,
        tree_backward,
        tree_forward,
    )
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, "HOIST": hoist, "SUBTREE": subtree[0],
                                                  "SUBTREE_BWD": subtree[1], "SUBTREE_UP": subtree[2]})
    gen = torch.Generator().manual_seed(T)
    K, V, NL = 16, 32, (T - 1).bit_length() - 6
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    qt, k, w, u = r(B, T, H, K), r(B, T, H, K) * 0.3, r(B, T, H, K) * 0.3, r(B, T, H, V)
    NC = -(-T // 64)
    gam = (-0.05 * torch.rand(B, NC, 64, H, generator=gen)).cumsum(2).view(B, NC * 64, H)[:, :T].contiguous()
    lw = torch.rand(B, T, H, NL, generator=gen)
    do, dst = r(B, T, H, V), (r(B, H, NL, K, V) if final else None)
    o = torch.zeros(B, T, H, V)
    # the kernels take the level weights lambda themselves (a slice of the op's [B, T, H, L]: a row stride above
    # NL), the reference their differences lw
    lam = torch.cat([lw.flip(-1).cumsum(-1).flip(-1), torch.rand(B, T, H, 3, generator=gen)], dim=-1)[..., :NL]
    st, _ = tree_forward(o, qt, k, w, u, gam, lam, 0.5, final)
    ref_o, ref_st = transition_tree_levels(qt, k, w, u, gam, lw, 0.5, final)
    assert rel(o, ref_o) < 1e-5
    if final:
        assert rel(st, ref_st) < 1e-5
    got = tree_backward(qt, k, w, u, gam, lam, 0.5, do, dst)
    ref = list(transition_tree_backward(qt, k, w, u, gam, lw, 0.5, do, dst))
    ref[5] = ref[5] - torch.nn.functional.pad(ref[5][..., :-1], (1, 0))   # d/dlam_i = dlw_i - dlw_{i-1}
    for name, a, b in zip(("qt", "k", "w", "u", "gam", "lam"), got, ref):
        assert rel(a, b) < 1e-5, name


@needs_triton
def test_interpreter_bounds_check_catches_an_overrun():
    """The bounds check below can fail: a kernel storing one element past its tensor is caught."""
    import triton
    import triton.language as tl
    from interp_bounds import bounds_checked

    @triton.jit
    def fill(x_ptr, n, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        tl.store(x_ptr + r, 1.0, mask=r < n)

    x = torch.zeros(8)
    with bounds_checked() as hits:
        fill[(1,)](x, 8, BLOCK=16)
        with pytest.raises(Exception, match="outside every tensor in fill"):
            fill[(1,)](x, 9, BLOCK=16)
    assert len(hits) == 1


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter's addresses")
@pytest.mark.parametrize("backend,cfg", [("triton", {}), ("triton_composed", {}),
                                         ("triton", {"LP": 2, "BV": 16, "stages": 1, "TREE": 0})])
def test_gdn_kernels_stay_inside_their_tensors(monkeypatch, backend, cfg):
    """Every load/store/atomic of the fused (and composed) log-linear GDN kernels, forward and backward,
    lies inside a tensor argument, in the shape of the GPU case that hit "an illegal memory access"
    (T=20000, D=64: a half-filled last chunk, an odd level count so the last level group is padded,
    two V blocks, two heads), at T = 8 * 64 + 32 (3 levels above the chunk): backend "triton" by the transition
    tree (its default) and, with TREE=0, by the level scans at the launch setting that faulted on an H200 (LP=2,
    BV=16, one stage; set_levels_config refuses it), whose addresses are in bounds here too: the fault is not an
    indexing error the interpreter can see. (Before TREE=0 was added here, in the eleventh session, that case had
    run the tree since the ninth, and no case checked the level scans' addresses.)"""
    from interp_bounds import bounds_checked
    from lctrain.kernels.loglinear import triton_levels
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, **cfg})
    T, D = 8 * 64 + 32, 64
    L = levels_needed(T)
    x = make_inputs("gdn", T, D, D, L, torch.float32, seed=41)
    do, dS = torch.randn(B, T, H, D, dtype=torch.float64), torch.randn(B, H, L, D, D, dtype=torch.float64)
    with bounds_checked() as hits:
        outputs_and_grads("gdn", x, backend, 0, do, dS, chunk_size=64)
    assert not hits


@needs_triton
@pytest.mark.parametrize("cfg,K", [({}, 16), ({"BV_grad": 32, "BV_gradq": 16}, 16),
                                   ({"BK_intra_bwd": 16, "BV_intra_bwd": 16}, 32)])
def test_fused_triton_batch_of_two_and_wider_values(monkeypatch, cfg, K):
    """B=2 and V=32 != K=16 (the kernels' batch and value offsets), against the torch backend; with the
    defaults the gradient pass's state part takes V in two blocks, its readout part in one, and the other way
    round with the second settings; the third takes K = V = 32 in two blocks each in the intra-chunk backward."""
    from lctrain.kernels.loglinear import triton_levels
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, **cfg})
    gen = torch.Generator().manual_seed(30)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    Bt, T, V = 2, 150, 32
    L = levels_needed(T)
    x = [r(Bt, T, H, K), F.normalize(r(Bt, T, H, K), dim=-1), r(Bt, T, H, V), F.logsigmoid(r(Bt, T, H) + 2.0),
         torch.sigmoid(r(Bt, T, H)), F.softplus(r(Bt, T, H, L))]
    do, dS = r(Bt, T, H, V), r(Bt, H, L, K, V)
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in x]
        o, S = loglinear_gated_delta_rule(*leaves, output_final_state=True, backend=backend, chunk_size=64)
        results.append((o, S, torch.autograd.grad((o * do).sum() + (S * dS).sum(), leaves)))
    (o_ref, S_ref, g_ref), (o, S, g) = results
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
    for name, got, want in zip(("q", "k", "v", "g", "beta", "lam"), g, g_ref):
        assert rel(got, want) < 1e-5, name


@needs_triton
def test_fused_triton_cu_seqlens_and_refusals():
    """cu_seqlens: every document from position 0 (one call each), against the naive op per document;
    chunk sizes other than 64 and float64 are refused by name."""
    bounds = [0, 70, 75, 200]
    T, K, V = 200, 16, 16
    L = levels_needed(125)
    x = make_inputs("mamba2", T, K, V, L, torch.float32, seed=13)
    o, S = loglinear_gated_linear_attn(x["q"], x["k"], x["v"], x["g"], x["lam"], output_final_state=True,
                                       backend="triton", cu_seqlens=torch.tensor(bounds))
    for i, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
        doc = {n: (None if t is None else t[:, bos:eos]) for n, t in x.items()}
        o_ref, S_ref = call("mamba2", doc, "naive")
        assert rel(o[:, bos:eos], o_ref) < 1e-5 and rel(S[i:i + 1], S_ref) < 1e-5
    short = {n: (None if t is None else t[:, :100]) for n, t in x.items()}
    with pytest.raises(ValueError, match="chunk_size=64"):
        call("mamba2", short, "triton", chunk_size=32)
    with pytest.raises(TypeError, match="float64"):
        call("mamba2", {n: (None if t is None else t.double()) for n, t in short.items()}, "triton", chunk_size=64)


def test_errors_name_the_argument():
    x = make_inputs("gdn", 9, 4, 4, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match="L >= 5"):
        call("gdn", x, "torch")
    x = make_inputs("gdn", 9, 4, 4, 5, torch.float32, seed=0)
    x["init"] = torch.zeros(B, H, 5, 4, 4)
    with pytest.raises(ValueError, match="position_offset"):
        call("gdn", x, "torch", p0=0)
    with pytest.raises(ValueError, match="initial_state with cu_seqlens"):
        loglinear_gated_linear_attn(x["q"], x["k"], x["v"], x["g"], x["lam"], initial_state=x["init"],
                                    position_offset=3, cu_seqlens=torch.tensor([0, 4, 9]))
    x["init"] = None
    with pytest.raises(ValueError, match="cu_seqlens"):
        loglinear_gated_linear_attn(x["q"], x["k"], x["v"], x["g"], x["lam"], cu_seqlens=torch.tensor([0, 5, 4, 9]))
    with pytest.raises(ValueError, match="unknown backend"):
        call("gdn", x, "fast")
    with pytest.raises(ValueError, match="level_weights must be"):
        loglinear_gated_linear_attn(x["q"], x["k"], x["v"], x["g"], x["lam"][:, :4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,p0", [(1000, 0), (4096, 0), (777, 300)])
def test_triton_bf16_on_gpu_matches_float32_torch(kind, T, p0):
    """`pytest -m gpu`: the triton backend in bfloat16 against the torch backend in float32 (itself equal
    to the naive recurrence on CPU), outputs, level states and every gradient within 2e-2."""
    K = V = 64
    L = levels_needed(p0 + T)
    gen = torch.Generator(device="cuda").manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    x = dict(q=r(B, T, H, K), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V),
             g=F.logsigmoid(r(B, T, H) + 3.0), beta=torch.sigmoid(r(B, T, H)) if kind == "gdn" else None,
             lam=F.softplus(r(B, T, H, L)), init=r(B, H, L, K, V) * 0.1 if p0 else None)
    do, dS = r(B, T, H, V).double(), r(B, H, L, K, V).double()
    ref = outputs_and_grads(kind, x, "torch", p0, do, dS, chunk_size=64)
    xb = {n: (t.bfloat16() if n in ("q", "k", "v") else t) for n, t in x.items()}
    o, S, g = outputs_and_grads(kind, xb, "triton", p0, do, dS, chunk_size=64)
    assert rel(o, ref[0]) < 2e-2 and rel(S, ref[1]) < 2e-2
    for name in ref[2]:
        assert rel(g[name], ref[2][name]) < 2e-2, name


def test_recomputed_level_runs_give_the_same_gradients(monkeypatch):
    """The memory-saving path of long sequences (every level run recomputed in the backward)."""
    from lctrain.kernels.loglinear import chunk
    T, K, V = 40, 4, 4
    L = levels_needed(T)
    x = make_inputs("gdn", T, K, V, L, torch.float64, seed=21)
    do, dS = torch.randn(B, T, H, V, dtype=torch.float64), torch.randn(B, H, L, K, V, dtype=torch.float64)
    kept = outputs_and_grads("gdn", x, "torch", 0, do, dS, chunk_size=4)
    monkeypatch.setattr(chunk, "RECOMPUTE_LEVELS", True)
    monkeypatch.setattr(chunk, "INTRA_SEGMENT", 16)  # the intra-chunk pass in 3 pieces
    calls = []
    monkeypatch.setattr(chunk, "checkpoint", lambda fn, *a, **kw: calls.append(fn) or
                        torch.utils.checkpoint.checkpoint(fn, *a, **kw))
    recomputed = outputs_and_grads("gdn", x, "torch", 0, do, dS, chunk_size=4)
    assert len(calls) == 3 + (levels_needed(T) - 1 - 2)  # 3 intra pieces + every level above log2(4)
    assert rel(recomputed[0], kept[0]) < 1e-12
    for name in kept[2]:
        assert rel(recomputed[2][name], kept[2][name]) < 1e-12, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,D", [(20000, 64), (4096, 128)])
def test_fused_triton_gpu_long_and_wide(kind, T, D):
    """`pytest -m gpu`: the fused kernels in bfloat16 over 9 levels above the chunk (T=20000, ragged) and at
    the benchmark's head dim 128, against the torch backend in float32 and against triton_composed."""
    L = levels_needed(T)
    gen = torch.Generator(device="cuda").manual_seed(T + D)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    x = dict(q=r(B, T, H, D), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D),
             g=F.logsigmoid(r(B, T, H) + 3.0), beta=torch.sigmoid(r(B, T, H)) if kind == "gdn" else None,
             lam=F.softplus(r(B, T, H, L)), init=None)
    do, dS = r(B, T, H, D).double(), r(B, H, L, D, D).double()
    ref = outputs_and_grads(kind, x, "torch", 0, do, dS, chunk_size=64)
    xb = {n: (t.bfloat16() if n in ("q", "k", "v") else t) for n, t in x.items()}
    errors = {}
    for backend in ("triton", "triton_composed"):
        o, S, g = outputs_and_grads(kind, xb, backend, 0, do, dS, chunk_size=64)
        torch.cuda.synchronize()  # a device fault is reported here, under the backend that caused it
        errors[backend] = {"o": rel(o, ref[0]), "S": rel(S, ref[1]), **{n: rel(g[n], ref[2][n]) for n in ref[2]}}
    # both backends in the message: a bf16 error shared by both is precision, one of "triton" alone a bug
    assert all(e < 2e-2 for e in errors["triton"].values()), errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_kept_level_states_on_gpu(monkeypatch, kind):
    """`pytest -m gpu`: KEEP_H=1 (the forward scan stores the level states while it writes the readout, a
    combination the CPU tests compile only in the interpreter) in bfloat16 at head dim 128 over 9 levels above
    the chunk: the same outputs and gradients as the recompute, up to the order of the fp32 atomic sums."""
    from lctrain.kernels.loglinear import triton_levels
    T, D = 20000, 128
    L = levels_needed(T)
    gen = torch.Generator(device="cuda").manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    x = dict(q=r(B, T, H, D).bfloat16(), k=F.normalize(r(B, T, H, D), dim=-1).bfloat16(), v=r(B, T, H, D).bfloat16(),
             g=F.logsigmoid(r(B, T, H) + 3.0), beta=torch.sigmoid(r(B, T, H)) if kind == "gdn" else None,
             lam=F.softplus(r(B, T, H, L)), init=None)
    do, dS = r(B, T, H, D).double(), r(B, H, L, D, D).double()
    runs = {}
    for keep in (0, 1):
        monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, "KEEP_H": keep})
        runs[keep] = outputs_and_grads(kind, x, "triton", 0, do, dS, chunk_size=64)
        torch.cuda.synchronize()
    errors = {"o": rel(runs[1][0], runs[0][0]), **{n: rel(runs[1][2][n], runs[0][2][n]) for n in runs[0][2]}}
    assert all(e < 1e-3 for e in errors.values()), errors



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [3.0, 8.0])
def test_block_totals_on_gpu(monkeypatch, kind, bias):
    """`pytest -m gpu`: block totals instead of the level scans (Gated DeltaNet: TREE=1, the transition tree in
    Triton; Mamba-2: SCALAR_TREE=1) in bfloat16 at head dim 128 over 9 levels above the chunk, against the torch backend
    in float32: as close as the level scans are (2e-2, the bound of the bf16 kernels above), outputs, final
    states and every gradient. bias 8: slow decays (0.9997 a token), chunk maps close to exp(gl) I (the tree
    keeps that part apart from the bf16 one)."""
    from lctrain.kernels.loglinear import triton_levels
    T, D = 20000, 128
    L = levels_needed(T)
    gen = torch.Generator(device="cuda").manual_seed(T + 1)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    x = dict(q=r(B, T, H, D), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D),
             g=F.logsigmoid(r(B, T, H) + bias), beta=torch.sigmoid(r(B, T, H)) if kind == "gdn" else None,
             lam=F.softplus(r(B, T, H, L)), init=None)
    do, dS = r(B, T, H, D).double(), r(B, H, L, D, D).double()
    ref = outputs_and_grads(kind, x, "torch", 0, do, dS, chunk_size=64)
    xb = {n: (t.bfloat16() if n in ("q", "k", "v") else t) for n, t in x.items()}
    errors = {}
    for tree in (0, 1):
        key = "SCALAR_TREE" if kind == "mamba2" else "TREE"
        monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, key: tree})
        o, S, g = outputs_and_grads(kind, xb, "triton", 0, do, dS, chunk_size=64)
        torch.cuda.synchronize()
        errors[f"TREE={tree}"] = {"o": rel(o, ref[0]), "S": rel(S, ref[1]), **{n: rel(g[n], ref[2][n]) for n in ref[2]}}
    print(kind, bias, errors)
    assert all(e < 2e-2 for e in errors["TREE=1"].values()), errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bias", [3.0, 8.0])
def test_transition_tree_from_incoming_states_on_gpu(monkeypatch, bias):
    """`pytest -m gpu`: the transition tree from incoming states (a CP rank's shard: 8192 tokens from position 8192,
    the top level continuing its block) in bfloat16 at head dim 128, against the torch backend in float32, as
    close as the level scans (printed beside it) and within 2e-2: outputs, final states, every gradient."""
    from lctrain.kernels.loglinear import triton_levels
    T, p0, D = 8192, 8192, 128
    L = levels_needed(p0 + T)
    gen = torch.Generator(device="cuda").manual_seed(T + 2)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    x = dict(q=r(B, T, H, D), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D),
             g=F.logsigmoid(r(B, T, H) + bias), beta=torch.sigmoid(r(B, T, H)), lam=F.softplus(r(B, T, H, L)),
             init=r(B, H, L, D, D) * 0.1)
    do, dS = r(B, T, H, D).double(), r(B, H, L, D, D).double()
    ref = outputs_and_grads("gdn", x, "torch", p0, do, dS, chunk_size=64)
    xb = {n: (t.bfloat16() if n in ("q", "k", "v") else t) for n, t in x.items()}
    errors = {}
    for tree in (0, 1):
        monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, "TREE": tree})
        o, S, g = outputs_and_grads("gdn", xb, "triton", p0, do, dS, chunk_size=64)
        torch.cuda.synchronize()
        errors[f"TREE={tree}"] = {"o": rel(o, ref[0]), "S": rel(S, ref[1]), **{n: rel(g[n], ref[2][n]) for n in ref[2]}}
    print("incoming", bias, errors)
    assert all(e < 2e-2 for e in errors["TREE=1"].values()), errors

def test_level_runs_of_one_chunk_take_the_torch_base_op():
    """Issue 18: a level run of at most one chunk per row (a Triton chunk count of 1, the call that faulted on an
    H200) goes to the torch base op even under backend "triton"; longer runs and batched blocks keep Triton."""
    from lctrain.kernels.loglinear.chunk import level_run
    calls = []

    def base(*xs, backend, chunk_size, **kw):
        calls.append((xs[0].shape[0], xs[0].shape[1], backend))
        return gated_delta_rule(*xs, backend="torch", chunk_size=chunk_size, **kw)

    x = make_inputs("gdn", 2 * 128 + 97, 4, 4, 1, torch.float64, seed=18)
    for T, start, want in [(2 * 128 + 32, 0, [(2, 128, "triton"), (1, 32, "torch")]),
                           (64 + 128 + 65, 64, [(1, 64, "torch"), (1, 128, "triton"), (1, 65, "triton")])]:
        calls.clear()
        piece = [x[n][:, :T] for n in ("q", "k", "v", "g", "beta")]
        level_run(base, *piece[:3], piece[3:], None, start, 128, "triton", 64)
        assert calls == want


@needs_triton
def test_level_launch_settings_are_checked_before_any_launch():
    """set_levels_config (LCTRAIN_LOGLINEAR_CFG, --levels-cfg) refuses unknown keys, blocks that are not powers
    of two, tree level counts out of range, and the setting that faulted on an H200; a refusal leaves the settings
    as they were."""
    from lctrain.kernels.loglinear import triton_levels
    before = dict(triton_levels.CONFIG)
    for bad, words in (({"LPX": 2}, "unknown key"), ({"BV": 24}, "power of two"), ({"ATOMIC": 2}, "0 or 1"),
                       ({"LP": 2, "BV": 16, "stages": 1}, "illegal memory access"), ({"SUBTREE": 7}, "in 0..6"),
                       ({"SUBTREE_UP": 0}, "in 1..6"), ({"SUBTREE_BWD": 2.0}, "in 0..6"),
                       ({"BK_intra_bwd": 48}, "power of two >= 16"), ({"BV_intra_bwd": 8}, "power of two >= 16"),
                       ({"warps_node": 0}, "positive int")):
        with pytest.raises(ValueError, match=words):
            triton_levels.set_levels_config(**bad)
        assert triton_levels.CONFIG == before
    old = triton_levels.set_levels_config(LP=2, BV=16, stages=2)   # two stages ran
    try:
        assert triton_levels.CONFIG["BV"] == 16 and old == before
    finally:
        triton_levels.set_levels_config(**old)
    assert triton_levels.CONFIG == before
    # the defaults' V block shrinks to the value dimension: at V = 16 the launch would be the faulting one, so
    # the scans take two stages there; at V = 32 they keep the defaults
    for V, stages in ((16, 2), (32, before["stages"])):
        qt, u = torch.empty(1, 64, 2, 16), torch.empty(1, 64, 2, V)
        cfg = triton_levels._launch_args(qt, u)[-1]
        assert cfg["stages"] == stages and cfg["LP"] == before["LP"], (V, cfg)

