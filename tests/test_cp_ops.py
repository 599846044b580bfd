"""Context parallelism on gloo CPU worlds of 2, 3 and 4 processes against one process.

Each world run checks several random cases (a world costs seconds to start): outputs, every rank's
outgoing state and the gradients of q, k, v, g, beta and the initial state equal the single-process op
on the full sequence (float32, <= 1e-5 relative to the largest reference value). The reference is the
full sequence run as P consecutive pieces chained through initial_state, which is the same op but
also exposes the state after every shard so that a loss may put weight on each rank's final state.
"""
from __future__ import annotations

import collections
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from dist_utils import WorkerError, run_world

OPS = {"delta": "delta_rule", "gated_delta": "gated_delta_rule", "gla": "gated_linear_attn"}
RTOL = 1e-5


def make_inputs(seed, kind, B, T, H, K, V, with_init):
    """Full-sequence inputs, identical on every process (same seed)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = {"q": r(B, T, H, K), "k": F.normalize(r(B, T, H, K), dim=-1), "v": r(B, T, H, V)}
    if kind in ("gated_delta", "gla"):
        x["g"] = -F.softplus(r(B, T, H)) * 0.3
    if kind in ("delta", "gated_delta"):
        x["beta"] = torch.sigmoid(r(B, T, H))
    x["init"] = r(B, H, K, V) if with_init else None
    x["do"] = r(B, T, H, V)
    return x


def op_args(kind, t):
    extra = {"delta": ("beta",), "gated_delta": ("g", "beta"), "gla": ("g",)}[kind]
    return (t["q"], t["k"], t["v"]) + tuple(t[n] for n in extra)


def leaves(kind, x, sl):
    """Slices of the full inputs as fresh leaves that require grad."""
    names = ["q", "k", "v"] + (["g"] if "g" in x else []) + (["beta"] if "beta" in x else [])
    return {n: x[n][:, sl].clone().requires_grad_() for n in names}


def state_weights(seed, P, B, H, K, V):
    gen = torch.Generator().manual_seed(seed + 7)
    return [torch.randn(B, H, K, V, generator=gen) for _ in range(P)]


def reference(case, P):
    """Single process: the full sequence as P consecutive pieces chained through the state."""
    from lctrain import kernels
    seed, kind, B, Tl, H, K, V, backend, chunk, with_init, weigh_states = case
    x = make_inputs(seed, kind, B, P * Tl, H, K, V, with_init)
    t = leaves(kind, x, slice(None))
    init = x["init"].clone().requires_grad_() if with_init else None
    W = state_weights(seed, P, B, H, K, V)
    fn = getattr(kernels, OPS[kind])
    full_args = op_args(kind, t)
    state, outs, states, loss = init, [], [], 0.0
    for r in range(P):
        sl = slice(r * Tl, (r + 1) * Tl)
        o, state = fn(*(a[:, sl] for a in full_args), initial_state=state, output_final_state=True,
                      backend="naive")
        outs.append(o)
        states.append(state)
        loss = loss + (o * x["do"][:, sl]).sum()
        if weigh_states:
            loss = loss + (state * W[r]).sum()
    loss.backward()
    # the chained naive reference checked against an independent implementation (chunkwise torch)
    o_direct, s_direct = fn(*op_args(kind, x), initial_state=x["init"], output_final_state=True, backend="torch",
                            chunk_size=chunk)
    grads = {n: v.grad for n, v in t.items()}
    return dict(o=torch.cat(outs, 1).detach(), states=[s.detach() for s in states], grads=grads,
                init_grad=None if init is None else init.grad, o_direct=o_direct, s_direct=s_direct)


@contextlib.contextmanager
def counting_passes():
    """Counts this process's calls of the CP state-pass primitives (as context_parallel calls them)."""
    import importlib
    cpm = importlib.import_module("lctrain.parallel.context_parallel")  # the module, not the function
    counts = collections.Counter()
    saved = {n: getattr(cpm, n) for n in ("shard_transition", "shard_final_state", "shard_state_grad")}

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call
    for name, fn in saved.items():
        setattr(cpm, name, counted(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(cpm, name, fn)


def cp_worker(rank, P, cases, checkpoint_mode="none", transition=None):
    """Runs every case on this rank's shard; returns the local outputs, state and gradients (and how
    often each CP state-pass primitive ran)."""
    import torch.distributed as dist
    from lctrain.parallel import context_parallel
    from torch.utils.checkpoint import checkpoint

    from lctrain import kernels

    out = []
    for case in cases:
        seed, kind, B, Tl, H, K, V, backend, chunk, with_init, weigh_states = case
        x = make_inputs(seed, kind, B, P * Tl, H, K, V, with_init)
        t = leaves(kind, x, slice(rank * Tl, (rank + 1) * Tl))
        init = x["init"].clone().requires_grad_() if with_init else None
        W = state_weights(seed, P, B, H, K, V)
        cp_op = context_parallel(getattr(kernels, OPS[kind]), dist.group.WORLD, transition=transition)

        def run(*tensors):  # called only within this iteration: late binding is harmless
            return cp_op(*tensors, initial_state=init, output_final_state=True,  # noqa: B023
                         backend=backend, chunk_size=chunk)  # noqa: B023

        args = op_args(kind, t)
        with counting_passes() as passes:
            if checkpoint_mode == "none":
                o, s = run(*args)
            else:
                o, s = checkpoint(run, *args, use_reentrant=(checkpoint_mode == "reentrant"))
            loss = (o * x["do"][:, rank * Tl:(rank + 1) * Tl]).sum()
            if weigh_states:
                loss = loss + (s * W[rank]).sum()
            loss.backward()
        out.append(dict(o=o.detach(), state=s.detach(), grads={n: v.grad for n, v in t.items()},
                        init_grad=None if init is None else init.grad,
                        gathers=cp_op.gathers, reused=cp_op.replays_reused, passes=dict(passes)))
    return out


def assert_close(got, want, what):
    scale = want.abs().max().clamp(min=1e-6)
    err = (got.double() - want.double()).abs().max() / scale
    assert err <= RTOL, f"{what}: max error {err:.2e} relative to max |ref| {scale:.3g} exceeds {RTOL}"


def check_world(P, cases, results):
    for i, case in enumerate(cases):
        ref = reference(case, P)
        Tl = case[3]
        tag = f"case {case}"
        assert_close(ref["o"], ref["o_direct"], f"{tag}: chained naive reference vs one chunkwise call")
        assert_close(ref["states"][-1], ref["s_direct"], f"{tag}: chained naive final state vs one chunkwise call")
        for r in range(P):
            got = results[r][i]
            sl = slice(r * Tl, (r + 1) * Tl)
            assert_close(got["o"], ref["o"][:, sl], f"{tag} rank {r}: output")
            assert_close(got["state"], ref["states"][r], f"{tag} rank {r}: outgoing state")
            for name, g in got["grads"].items():
                assert_close(g, ref["grads"][name][:, sl], f"{tag} rank {r}: d{name}")
            if ref["init_grad"] is not None:
                if r == 0:
                    assert_close(got["init_grad"], ref["init_grad"], f"{tag}: d initial_state")
                else:
                    assert got["init_grad"] is None, "initial_state of ranks > 0 must not get a gradient"


def random_cases(seed, n, backends=("naive", "torch")):
    """(seed, kind, B, T_local, H, K, V, backend, chunk, with_init, weigh_states) with random sizes."""
    gen = torch.Generator().manual_seed(seed)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=gen))]  # noqa: E731
    cases = []
    for i in range(n):
        kind = ("delta", "gated_delta", "gla")[i % 3]
        backend = backends[i % len(backends)]
        chunk = pick([4, 8])
        cases.append((seed * 100 + i, kind, pick([1, 2]), chunk * pick([1, 2, 3]), pick([1, 2]), pick([4, 8]),
                      pick([4, 6, 8]), backend, chunk, bool(i % 2), bool((i // 2) % 2)))
    return cases


# One process world per size runs every distributed check (a world costs seconds to start); the tests
# below read their part of its results. WORLD_PLANS[P]: what that world runs.
OPS_CASES = {P: random_cases(P, 6) for P in (2, 3, 4)}
# the Triton backend's CP primitives (interpreter on CPU, float32; its chunk size is 64)
OPS_CASES[2].append((77, "gated_delta", 1, 64, 1, 16, 16, "triton", 64, True, True))
CKPT_CASES = random_cases(11, 3, backends=("torch",))
# the grouped state passes (each shard's chunks in 2 parallel groups, then a fold): shards of 4 or 6 chunks
GROUPED_CASES = {P: [(50 + P * 10 + i, kind, 2 - i % 2, 4 * (4 + 2 * (i % 2)), 2, 8, 6, "torch", 4, bool(i % 2), True)
                     for i, kind in enumerate(("delta", "gated_delta", "gla"))] for P in (2, 3, 4)}
# transition="direct" (gated linear attention's closed-form passes): with and without initial state
DIRECT_CASES = {P: [(90 + P * 10 + i, "gla", 2 - i, 8 + 4 * i, 2, 8, 6, "torch", 4, bool(i), True) for i in range(2)]
                for P in (2, 3, 4)}
# transition="overlap" (the state passes inside the Triton op's own, kernels/triton/cp_overlap.py): the Triton
# interpreter, float32, chunks of 64; shards of 1 and 2 chunks, with and without initial state and state weights
OVERLAP_CASES = {2: [(131, "gated_delta", 1, 128, 2, 16, 16, "triton", 64, True, True),
                     (132, "delta", 2, 64, 2, 16, 16, "triton", 64, False, True),
                     (133, "gla", 1, 128, 2, 16, 16, "triton", 64, True, False)],
                 3: [(141, "gated_delta", 2, 64, 2, 16, 16, "triton", 64, True, True),
                     (142, "gla", 1, 64, 2, 16, 16, "triton", 64, False, True),
                     (143, "delta", 1, 64, 2, 16, 16, "triton", 64, True, False)],
                 4: [(151, "delta", 1, 128, 2, 16, 16, "triton", 64, True, True)]}
COMM_ARGS = {2: (7, 2, 6, 5, 4, 4, 8), 3: (8, 2, 6, 5, 4, 3, 8), 4: (9, 2, 6, 5, 4, 4, 8)}  # seed B Tl C ks H D
CKPT_MODES = ("non_reentrant", "reentrant")
ERROR_CASES = ("mismatch", "ragged", "heads", "recheck")


# ------------------------------------------------------------------ packed documents (cu_seqlens)
# (seed, kind, T_local, backend, chunk, global boundaries, with initial_state): documents that cross
# shard edges, start exactly at one, span whole shards, of one token and shorter than a chunk
H_DOC, K_DOC, V_DOC = 2, 4, 3
DOC_CASES = {
    2: [(21, "gated_delta", 8, "torch", 4, [0, 3, 8, 9, 16], True),
        (22, "delta", 8, "naive", 4, [0, 16], False),
        (23, "gla", 8, "torch", 4, [0, 11, 16], True)],
    3: [(31, "delta", 8, "torch", 4, [0, 5, 6, 19, 24], True),
        (32, "gla", 8, "naive", 4, [0, 8, 16, 24], False),
        (33, "gated_delta", 8, "torch", 8, [0, 1, 17, 24], False)],
    4: [(41, "gla", 4, "torch", 4, [0, 2, 13, 16], True),
        (42, "gated_delta", 4, "naive", 4, [0, 7, 8, 12, 15, 16], True),
        (43, "delta", 4, "torch", 4, [0, 6, 16], False)],
}


def doc_inputs(case, P):
    seed, kind, Tl, _, _, bounds, with_init = case
    x = make_inputs(seed, kind, 1, P * Tl, H_DOC, K_DOC, V_DOC, False)
    gen = torch.Generator().manual_seed(seed + 3)
    N = len(bounds) - 1
    x["init"] = torch.randn(N, H_DOC, K_DOC, V_DOC, generator=gen) if with_init else None
    W = [torch.randn(N, H_DOC, K_DOC, V_DOC, generator=gen) for _ in range(P)]
    return x, W


def doc_reference(case, P):
    """One process: the stream cut at every document boundary and shard edge, each segment run alone,
    chained through the state inside a document; rank r's returned states are those at the ends of its
    segments."""
    import bisect

    from lctrain import kernels
    seed, kind, Tl, _, _, bounds, with_init = case
    x, W = doc_inputs(case, P)
    t = leaves(kind, x, slice(None))
    init = x["init"].clone().requires_grad_() if with_init else None
    fn = getattr(kernels, OPS[kind])
    args = op_args(kind, t)
    cuts = sorted(set(bounds) | {r * Tl for r in range(P + 1)})
    states = [torch.zeros(len(bounds) - 1, H_DOC, K_DOC, V_DOC) for _ in range(P)]
    outs, state, loss = [], None, 0.0
    for s, e in zip(cuts[:-1], cuts[1:]):
        d, r = bisect.bisect_right(bounds, s) - 1, s // Tl
        if s == bounds[d]:
            state = None if init is None else init[d:d + 1]
        o, state = fn(*(a[:, s:e] for a in args), initial_state=state, output_final_state=True, backend="naive")
        outs.append(o)
        states[r] = states[r].index_copy(0, torch.tensor([d]), state)
        loss = loss + (o * x["do"][:, s:e]).sum() + (state * W[r][d]).sum()
    loss.backward()
    return dict(o=torch.cat(outs, 1).detach(), states=[s.detach() for s in states],
                grads={n: v.grad for n, v in t.items()}, init_grad=None if init is None else init.grad)


def cp_doc_worker(rank, P, cases, transition=None):
    import torch.distributed as dist
    from lctrain.parallel import context_parallel

    from lctrain import kernels

    out = []
    for case in cases:
        seed, kind, Tl, backend, chunk, bounds, with_init = case
        x, W = doc_inputs(case, P)
        t = leaves(kind, x, slice(rank * Tl, (rank + 1) * Tl))
        init = x["init"].clone().requires_grad_() if with_init else None
        cp_op = context_parallel(getattr(kernels, OPS[kind]), dist.group.WORLD, transition=transition)
        o, s = cp_op(*op_args(kind, t), initial_state=init, output_final_state=True, backend=backend,
                     chunk_size=chunk, cu_seqlens=torch.tensor(bounds))
        loss = (o * x["do"][:, rank * Tl:(rank + 1) * Tl]).sum() + (s * W[rank]).sum()
        loss.backward()
        out.append(dict(o=o.detach(), state=s.detach(), grads={n: v.grad for n, v in t.items()},
                        init_grad=None if init is None else init.grad))
    return out


def world_worker(rank, P):
    # "sequential" named: the default ("auto") runs the Triton case at P = 2 as "pipeline" (its own part below)
    out = {"ops": cp_worker(rank, P, OPS_CASES[P], transition="sequential"),
           "comm": comm_worker(rank, P, *COMM_ARGS[P]),
           "docs": cp_doc_worker(rank, P, DOC_CASES[P]),
           # the reference that skips no pass (every rank runs (A, B) from zero and G)
           "ops all": cp_worker(rank, P, OPS_CASES[P], transition="sequential_all"),
           "docs all": cp_doc_worker(rank, P, DOC_CASES[P], transition="sequential_all"),
           "grouped": cp_worker(rank, P, GROUPED_CASES[P], transition="grouped+grad:2"),
           "direct": cp_worker(rank, P, DIRECT_CASES[P], transition="direct"),
           "overlap": cp_worker(rank, P, OVERLAP_CASES[P], transition="overlap"),
           "pipeline": cp_worker(rank, P, OVERLAP_CASES[P], transition="pipeline")}
    if P == 4:
        out["mesh"] = mesh_worker(rank, P)
    if P == 2:
        out["ckpt"] = {mode: cp_worker(rank, P, CKPT_CASES, mode) for mode in CKPT_MODES}
        for transition in ("overlap", "pipeline"):
            out[f"ckpt {transition}"] = {mode: cp_worker(rank, P, OVERLAP_CASES[P][:1], mode, transition=transition)
                                         for mode in CKPT_MODES}
        from lctrain.kernels.triton import ops
        previous = ops.set_config(fuse_out=1)  # the forward's fix-up inside the output kernel
        try:
            out["overlap fused"] = cp_worker(rank, P, OVERLAP_CASES[P][:1], transition="overlap")
        finally:
            ops.set_config(**previous)
        out["errors"] = {what: error_worker(rank, P, what) for what in ERROR_CASES}
    return out


@functools.lru_cache(maxsize=None)
def world(P):
    """Results of world_worker on every rank of a P-process gloo world (run once per session)."""
    return run_world(world_worker, P, timeout=300)


def part(P, key):
    return [r[key] for r in world(P)]


@pytest.mark.parametrize("P", [2, 3, 4])
def test_cp_ops_match_single_process(P):
    results = part(P, "ops")
    check_world(P, OPS_CASES[P], results)
    for r in range(P):
        assert all(res["gathers"] == 1 for res in results[r]), "one state all-gather per forward"


@pytest.mark.parametrize("P", [2, 3, 4])
def test_cp_grouped_transition_matches_single_process(P):
    """transition="grouped+grad:2" (both state passes grouped) gives the sequential path's results: outputs, states and
    every gradient
    equal the single process (whose chained reference the sequential path is tested against above)."""
    check_world(P, GROUPED_CASES[P], part(P, "grouped"))


@pytest.mark.parametrize("P", [2, 3, 4])
def test_cp_direct_transition_matches_single_process(P):
    """transition="direct" (gated linear attention's state passes in closed form): outputs, states and every
    gradient equal the single process."""
    check_world(P, DIRECT_CASES[P], part(P, "direct"))


@pytest.mark.parametrize("P", [2, 3, 4])
def test_cp_overlap_transition_matches_single_process(P):
    """transition="overlap" (each rank's state passes run inside its Triton op, fixed up once S_in and dS_out
    arrive): outputs, states and every gradient equal the single process; one state all-gather per forward."""
    results = part(P, "overlap")
    check_world(P, OVERLAP_CASES[P], results)
    assert all(res["gathers"] == 1 for r in range(P) for res in results[r])


@pytest.mark.parametrize("P", [2, 3, 4])
def test_cp_pipeline_transition_matches_single_process(P):
    """transition="pipeline" ("overlap" where the last rank waits for S_in and rank 0 for dS_out, then
    both run the plain passes from the exact state): outputs, states and every gradient equal the single
    process, with and without an initial state and a gradient on the last rank's final state."""
    results = part(P, "pipeline")
    check_world(P, OVERLAP_CASES[P], results)
    assert all(res["gathers"] == 1 for r in range(P) for res in results[r])


def test_cp_overlap_with_the_fix_up_in_the_output_kernel():
    """transition="overlap" with launch key fuse_out=1 (S_in's part added inside output_fwd) on 2 ranks."""
    check_world(2, OVERLAP_CASES[2][:1], part(2, "overlap fused"))


@pytest.mark.parametrize("P", [2, 3, 4])
def test_cp_with_cu_seqlens_matches_single_process(P):
    """Packed documents under CP (global cu_seqlens): outputs, each rank's per-document states, the
    gradients of every input and (summed over ranks) of the per-document initial states."""
    check_doc_world(P, DOC_CASES[P], part(P, "docs"))


def check_doc_world(P, cases, results):
    for i, case in enumerate(cases):
        ref = doc_reference(case, P)
        Tl = case[2]
        for r in range(P):
            got, sl, tag = results[r][i], slice(r * Tl, (r + 1) * Tl), f"case {case} rank {r}"
            assert_close(got["o"], ref["o"][:, sl], f"{tag}: output")
            assert_close(got["state"], ref["states"][r], f"{tag}: per-document states")
            for name, g in got["grads"].items():
                assert_close(g, ref["grads"][name][:, sl], f"{tag}: d{name}")
        if ref["init_grad"] is not None:
            assert_close(sum(results[r][i]["init_grad"] for r in range(P)), ref["init_grad"],
                         f"case {case}: d initial_state summed over ranks")


def assert_same_results(new, old, what):
    """Two CP runs of the same cases (lists of result dicts per rank) agree: outputs, states, gradients."""
    for r, (new_r, old_r) in enumerate(zip(new, old)):
        for i, (a, b) in enumerate(zip(new_r, old_r)):
            tag = f"{what}, case {i} rank {r}"
            assert_close(a["o"], b["o"], f"{tag}: output")
            assert_close(a["state"], b["state"], f"{tag}: outgoing state")
            assert a["grads"].keys() == b["grads"].keys()
            for name in a["grads"]:
                assert_close(a["grads"][name], b["grads"][name], f"{tag}: d{name}")
            assert (a["init_grad"] is None) == (b["init_grad"] is None), f"{tag}: d initial_state given on one only"
            if a["init_grad"] is not None:
                assert_close(a["init_grad"], b["init_grad"], f"{tag}: d initial_state")


@pytest.mark.parametrize("P", [2, 3, 4])
def test_cp_skipping_unread_passes_matches_the_all_ranks_reference(P):
    """The default path computes only what another rank reads: rank 0 the A-free pass from its initial
    state, the last rank no forward pass, rank 0 no state-gradient pass, middle ranks (A, B) and G. It
    equals transition="sequential_all" (every rank runs every pass from zero) and one process: outputs,
    states and every gradient incl. initial_state, with and without initial_state, and with packed
    documents crossing shard edges (where a shard's last piece starts a document its pass is A-free too)."""
    new, old = part(P, "ops"), part(P, "ops all")
    check_world(P, OPS_CASES[P], old)
    assert_same_results(new, old, "ops: skipping vs sequential_all")
    for i, case in enumerate(OPS_CASES[P]):
        weigh_states = case[-1]
        for r in range(P):
            last = r == P - 1
            # the last rank computes its own A only for a gradient on its returned final state
            want_new = {"shard_final_state": int(r == 0),
                        "shard_transition": int(0 < r < P - 1 or (last and weigh_states)),
                        "shard_state_grad": int(r > 0)}
            got = {n: new[r][i]["passes"].get(n, 0) for n in want_new}
            assert got == want_new, f"case {case} rank {r}: passes run {got}, want {want_new}"
            got_old = {n: old[r][i]["passes"].get(n, 0) for n in want_new}
            assert got_old == {"shard_final_state": 0, "shard_transition": 1, "shard_state_grad": 1}, (case, r, got_old)
    docs_new, docs_old = part(P, "docs"), part(P, "docs all")
    check_doc_world(P, DOC_CASES[P], docs_old)
    assert_same_results(docs_new, docs_old, "documents: skipping vs sequential_all")


def test_auto_transition_is_pipeline_only_at_two_ranks_on_triton_without_documents():
    """The default transition ("auto"): pipeline at CP = 2 on the Triton backend (here the interpreter) without
    packed documents; sequential on the torch / naive backends, with documents and at CP > 2."""
    from lctrain.parallel.context_parallel import DEFAULT_TRANSITION, _parse_transition, auto_transition

    cpu = torch.device("cpu")
    assert DEFAULT_TRANSITION == "auto" and _parse_transition("auto") == ("auto", None)
    assert auto_transition(2, "triton", cpu, False) == "pipeline"
    assert [auto_transition(2, "torch", cpu, False), auto_transition(2, "auto", cpu, False),
            auto_transition(2, "naive", cpu, False), auto_transition(2, "triton", cpu, True),
            auto_transition(3, "triton", cpu, False), auto_transition(4, "triton", cpu, False)] == ["sequential"] * 6


def test_cp_under_activation_checkpointing():
    """Non-reentrant checkpoint replays reuse the gathered state (no second gather) and stay exact;
    reentrant checkpoint communicates again, in the same order on every rank, without deadlock."""
    P = 2
    for mode, gathers, reused in (("non_reentrant", 1, 1), ("reentrant", 2, 0)):
        results = [r[mode] for r in part(P, "ckpt")]
        check_world(P, CKPT_CASES, results)
        for r in range(P):
            for res in results[r]:
                assert (res["gathers"], res["reused"]) == (gathers, reused), (mode, res["gathers"], res["reused"])
        # the same with transition="overlap" / "pipeline", whose exchanges run inside the Triton op
        for transition in ("overlap", "pipeline"):
            results = [r[f"ckpt {transition}"][mode] for r in world(P)]
            check_world(P, OVERLAP_CASES[P][:1], results)
            for r in range(P):
                for res in results[r]:
                    assert (res["gathers"], res["reused"]) == (gathers, reused), (transition, mode, res["gathers"],
                                                                                  res["reused"])


def error_worker(rank, P, what):
    import torch.distributed as dist
    from lctrain.kernels import gated_delta_rule
    from lctrain.parallel import context_parallel
    from lctrain.parallel.context_parallel import ContextParallelError

    if what == "heads":
        from lctrain.parallel.ulysses import ulysses_attention
        q = torch.randn(1, 4, 3, 8)
        try:
            ulysses_attention(q, q, q, dist.group.WORLD, _causal_sdpa)
        except ValueError as err:
            return str(err)
        return None
    if what == "recheck":  # shapes are checked across ranks again only when they change
        op = context_parallel(gated_delta_rule, dist.group.WORLD)
        for Tl in (8, 8, 16, 16, 8):
            x = [torch.randn(1, Tl, 2, 4) for _ in range(3)] + [-torch.rand(1, Tl, 2), torch.rand(1, Tl, 2)]
            op(*x, chunk_size=4, backend="torch")
        return (op.shape_checks, op.gathers)
    Tl = 8 if what != "ragged" else 6
    if what == "mismatch" and rank == 1:
        Tl = 16
    B, H, K = 1, 2, 4
    q, k, v = (torch.randn(B, Tl, H, K) for _ in range(3))
    g, beta = -torch.rand(B, Tl, H), torch.rand(B, Tl, H)
    op = context_parallel(gated_delta_rule, dist.group.WORLD)
    try:
        op(q, k, v, g, beta, chunk_size=4 if what != "ragged" else 4, backend="torch")
    except ContextParallelError as err:
        return str(err)
    return None


def test_cp_errors_are_raised_on_every_rank():
    errors = part(2, "errors")
    for what, expected in (("mismatch", "disagree on shapes"), ("ragged", "cp * chunk_size = 8"),
                           ("heads", "multiple of parallel.cp=2")):
        msgs = [e[what] for e in errors]
        assert all(m and expected in m for m in msgs), (what, msgs)
    assert all(e["recheck"] == (3, 5) for e in errors), [e["recheck"] for e in errors]


def test_cp_rejects_bad_group_and_op():
    from lctrain.kernels import delta_rule
    from lctrain.parallel import context_parallel
    from lctrain.parallel.context_parallel import ContextParallelError

    with pytest.raises(ContextParallelError, match="ProcessGroup"):
        context_parallel(delta_rule, group="cp")
    with pytest.raises(ContextParallelError, match="unsupported op"):
        context_parallel(torch.matmul, group=None)
    with pytest.raises(ContextParallelError, match="transition='direct'.*gated_linear_attn"):
        context_parallel(delta_rule, None, transition="direct")
    with pytest.raises(ContextParallelError, match="transition='direct:2'"):
        context_parallel("gated_linear_attn", None, transition="direct:2")
    # no group: the plain op
    q, k, v = (torch.randn(1, 8, 1, 4) for _ in range(3))
    beta = torch.rand(1, 8, 1)
    o1, _ = context_parallel(delta_rule, None)(q, k, v, beta, backend="naive")
    o2, _ = delta_rule(q, k, v, beta, backend="naive")
    torch.testing.assert_close(o1, o2)


def mesh_worker(rank, P):
    """megatron-core groups for tp=2 x cp=2 on the already initialised world, then torn down."""
    import torch.distributed as dist
    from lctrain.parallel import mesh
    info = mesh.init_mesh({"tp": 2, "cp": 2, "pp": 1}, "cpu")
    assert mesh.init_mesh({"tp": 2, "cp": 2}) is info, "init_mesh must be idempotent"
    try:
        mesh.init_mesh({"tp": 1, "cp": 4})
        clash = None
    except RuntimeError as err:
        clash = str(err)
    ranks = lambda g: None if g is None else dist.get_process_group_ranks(g)  # noqa: E731
    out = dict(info=info, cp=ranks(mesh.cp_group()), tp=ranks(mesh.tp_group()), dp_cp=ranks(mesh.dp_cp_group()),
               cp_rank=mesh.cp_rank(), tp_rank=mesh.tp_rank(), dp=(mesh.dp_rank(), mesh.dp_size()), clash=clash,
               main=mesh.is_main())
    mesh.destroy_mesh()
    out["after"] = (mesh.mesh_info(), mesh.cp_size(), dist.is_initialized())
    return out


def test_mesh_groups_tp2_cp2():
    for rank, m in enumerate(part(4, "mesh")):
        assert (m["info"].tp, m["info"].cp, m["info"].dp, m["info"].world_size) == (2, 2, 1, 4)
        # megatron order tp-cp-...: tp pairs are neighbours, cp pairs stride over tp
        assert m["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert m["cp"] == [rank % 2, rank % 2 + 2] and m["cp_rank"] == rank // 2 and m["tp_rank"] == rank % 2
        assert m["dp_cp"] == m["cp"] and m["dp"] == (0, 1)
        assert m["main"] == (rank == 0)
        assert m["clash"] and "destroy_mesh" in m["clash"]
        assert m["after"] == (None, 1, True), "destroy_mesh keeps a process group it did not create"


def test_mesh_single_process():
    import torch.distributed as dist
    from lctrain.parallel import mesh
    if dist.is_initialized():
        pytest.skip("this pytest process already has a process group")
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp"):
        mesh.init_mesh({"cp": 2})
    assert not dist.is_initialized(), "a failed init_mesh must not leave a process group behind"
    try:
        info = mesh.init_mesh(None, "cpu")
        assert (info.world_size, info.cp, info.dp, info.backend) == (1, 1, 1, "gloo")
        assert mesh.cp_group() is None and mesh.cp_size() == 1 and mesh.dp_cp_group() is not None
    finally:
        mesh.destroy_mesh()
    assert not dist.is_initialized() and mesh.mesh_info() is None
    with pytest.raises(ValueError, match="parallel.cp must be an integer >= 1"):
        mesh.init_mesh({"cp": 0})


def failing_worker(rank, P):
    if rank == 1:
        raise RuntimeError("boom on purpose")
    import torch.distributed as dist
    dist.barrier()  # would hang forever without fail-fast


def test_dist_utils_fails_fast():
    with pytest.raises(WorkerError, match="boom on purpose"):
        run_world(failing_worker, 2, timeout=60)


# ------------------------------------------------------------------ halo exchange and Ulysses attention

def _causal_sdpa(q, k, v):
    """[B, T, H, D] -> [B, T, H, D] causal softmax attention."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def _halo_conv_inputs(seed, P, B, Tl, C, ks):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, P * Tl, C, generator=gen), torch.randn(C, ks, generator=gen),
            torch.randn(B, P * Tl, C, generator=gen))


def _ulysses_inputs(seed, P, B, Tl, H, D):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, P * Tl, H, D, generator=gen) for _ in range(4)]  # q, k, v, do


def comm_worker(rank, P, seed, B, Tl, C, ks, H, D):
    """Short causal depthwise conv through prepend_halo, and Ulysses attention, on this rank's shard."""
    import torch.distributed as dist
    from lctrain.parallel.halo import prepend_halo
    from lctrain.parallel.ulysses import ulysses_attention

    group = dist.group.WORLD
    sl = slice(rank * Tl, (rank + 1) * Tl)
    x_full, w_full, dy = _halo_conv_inputs(seed, P, B, Tl, C, ks)
    x = x_full[:, sl].clone().requires_grad_()
    w = w_full.clone().requires_grad_()
    xh = prepend_halo(x, ks - 1, group, dim=1)                       # [B, Tl + ks - 1, C]
    y = F.conv1d(xh.transpose(1, 2), w[:, None, :], groups=C).transpose(1, 2)
    (y * dy[:, sl]).sum().backward()
    dw = w.grad.clone()
    dist.all_reduce(dw)                                              # parameter gradients sum over CP

    q_full, k_full, v_full, do = _ulysses_inputs(seed, P, B, Tl, H, D)
    q, k, v = (t[:, sl].clone().requires_grad_() for t in (q_full, k_full, v_full))
    o = ulysses_attention(q, k, v, group, _causal_sdpa)
    (o * do[:, sl]).sum().backward()
    return dict(y=y.detach(), dx=x.grad, dw=dw, o=o.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


@pytest.mark.parametrize("P", [2, 3, 4])
def test_halo_conv_and_ulysses_match_single_process(P):
    seed, B, Tl, C, ks, H, D = COMM_ARGS[P]
    results = part(P, "comm")

    x_full, w_full, dy = _halo_conv_inputs(seed, P, B, Tl, C, ks)
    x, w = x_full.clone().requires_grad_(), w_full.clone().requires_grad_()
    y = F.conv1d(F.pad(x.transpose(1, 2), (ks - 1, 0)), w[:, None, :], groups=C).transpose(1, 2)
    (y * dy).sum().backward()

    q_full, k_full, v_full, do = _ulysses_inputs(seed, P, B, Tl, H, D)
    q, k, v = (t.clone().requires_grad_() for t in (q_full, k_full, v_full))
    o = _causal_sdpa(q, k, v)
    (o * do).sum().backward()

    for r, got in enumerate(results):
        sl = slice(r * Tl, (r + 1) * Tl)
        assert_close(got["y"], y.detach()[:, sl], f"rank {r}: conv output")
        assert_close(got["dx"], x.grad[:, sl], f"rank {r}: conv input gradient (halo gradient returned)")
        assert_close(got["dw"], w.grad, f"rank {r}: conv weight gradient summed over CP")
        assert_close(got["o"], o.detach()[:, sl], f"rank {r}: Ulysses output")
        for name, ref in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            assert_close(got[name], ref[:, sl], f"rank {r}: Ulysses {name}")


def test_halo_and_ulysses_without_group():
    from lctrain.parallel.halo import prepend_halo
    from lctrain.parallel.ulysses import ulysses_attention

    x = torch.randn(2, 5, 3)
    out = prepend_halo(x, 2, None, dim=1)
    assert out.shape == (2, 7, 3) and out[:, :2].abs().sum() == 0 and torch.equal(out[:, 2:], x)
    assert prepend_halo(x, 0, None) is x
    with pytest.raises(ValueError, match="exceeds the local shard"):
        prepend_halo(x, 6, None, dim=1)
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    torch.testing.assert_close(ulysses_attention(q, k, v, None, _causal_sdpa), _causal_sdpa(q, k, v))


def test_bench_cp_runs_on_cpu(tmp_path):
    """`lctrain bench cp --device cpu` launches torchrun with 2 gloo ranks and writes its JSON/markdown; the
    default path and the skip-nothing reference each get a row with their state-pass times."""
    import json

    from lctrain.bench.cp import COLUMNS, main

    out, md = tmp_path / "cp.json", tmp_path / "BENCH.md"
    rc = main(["--device", "cpu", "--nproc", "2", "--T", "16", "--H", "2", "--D", "8", "--chunk-size", "8",
               "--warmup", "0", "--iters", "1", "--transition", "sequential", "sequential_all", "--json", str(out),
               "--record", str(md)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["columns"] == COLUMNS and len(result["rows"]) == 2 and "partial" not in result  # the final write
    rows = [dict(zip(COLUMNS, r)) for r in result["rows"]]
    assert [row["transition"] for row in rows] == ["sequential", "sequential_all"]
    for row in rows:
        assert row["T/rank"] == 16 and row["T total"] == 32
        assert row["CP fwd+bwd ms"] > 0 and row["efficiency"] > 0
        assert row["state pass ms"] > 0 and row["state-grad pass ms"] > 0
    assert "weak scaling, CP=2" in md.read_text()


def test_bench_cp_runs_softmax_layers_on_cpu(tmp_path):
    """`lctrain bench cp --layer swa attn` end to end on 2 gloo ranks (halo exchange; Ulysses through
    DeepSpeed's CPU accelerator): one row each, with the one-device run at the total length (always on
    for these layers: the strong-scaling ratio), and the stage progress lines on stderr."""
    import json
    import subprocess
    import sys

    from lctrain.bench.cp import COLUMNS

    out = tmp_path / "cp.json"
    proc = subprocess.run([sys.executable, "-m", "lctrain.cli", "bench", "cp", "--device", "cpu", "--nproc", "2",
                           "--layer", "swa", "attn", "--T", "16", "--window", "8", "--H", "2", "--D", "8",
                           "--chunk-size", "8", "--warmup", "0", "--iters", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [dict(zip(COLUMNS, r)) for r in json.loads(out.read_text())["rows"]]
    assert [(r["layer"], r["transition"], r["T/rank"], r["T total"]) for r in rows] == [
        ("swa", "halo", 16, 32), ("attn", "ulysses", 16, 32)]
    for row in rows:
        for col in ("1-dev fwd+bwd ms", "CP fwd+bwd ms", "efficiency", "1-dev at T total fwd+bwd ms",
                    "CP time / 1-dev at T total"):
            assert row[col] > 0, (row["layer"], col)
        assert abs(row["efficiency"] - row["1-dev fwd+bwd ms"] / row["CP fwd+bwd ms"]) < 0.01
    for stage in ("1 device at T", "CP=2 at 2*T", "1 device at 2*T"):
        assert f"swa T/rank 16: {stage}: first call" in proc.stderr
        assert f"attn T/rank 16: {stage} measured" in proc.stderr


def test_bench_cp_refuses_a_window_longer_than_the_shard():
    from lctrain.bench.cp import _parse

    with pytest.raises(SystemExit):
        _parse(["--device", "cpu", "--layer", "swa", "--T", "16", "--window", "32"])
    assert _parse(["--device", "cpu", "--layer", "swa", "--T", "16", "--window", "17"]).window == 17


def test_bench_cp_parts_runs_on_cpu(tmp_path):
    """`python -m lctrain.bench.cp_parts` on CPU (torch backend): every way of the state passes is timed
    and gives the sequential pass's result up to float rounding."""
    import json

    from lctrain.bench.cp_parts import COLUMNS, main

    out = tmp_path / "parts.json"
    rc = main(["--layer", "gdn", "gla", "--T", "32", "--H", "2", "--D", "8", "--chunk-size", "8", "--dtype", "fp32",
               "--transition", "grouped:2", "grouped+grad:4", "--cfg", "--warmup", "0", "--iters", "1",
               "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert "partial" not in result  # rewritten after every row, marked partial until the end
    rows = [dict(zip(COLUMNS, r)) for r in result["rows"]]
    ways = {(r["layer"], r["pass"], r["way"]) for r in rows}
    for layer in ("gdn", "gla"):
        assert {(layer, "transition", "grouped:2"), (layer, "state grad", "grouped+grad:4"),
                (layer, "op", "fwd+bwd"), (layer, "final state", "sequential")} <= ways
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["rel diff"] <= 1e-5 for r in rows if r["rel diff"] is not None)


def test_bench_cp_parts_cut_or_out_of_time_keeps_its_rows(tmp_path, monkeypatch):
    """cp_parts killed during its third timing leaves the two rows it measured, marked partial (mid-case: 0 of
    2 cases, plus 2 rows); with --time-limit it stops starting rows and its final JSON names what was not run."""
    import json
    import time

    from lctrain.bench import cp_parts

    calls = []

    def timed(fn, warmup, iters, device, kill_at=None):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt  # stands in for the device call's kill
        time.sleep(0.3 if kill_at is None else 0)
        return 1.0
    argv = ["--layer", "gdn", "gla", "--T", "32", "--H", "2", "--D", "8", "--chunk-size", "8", "--dtype", "fp32",
            "--transition", "grouped:2", "--cfg", "--warmup", "0", "--iters", "1"]
    out = tmp_path / "cut.json"
    monkeypatch.setattr(cp_parts, "_timed_ms", lambda *a: timed(*a, kill_at=3))
    with pytest.raises(KeyboardInterrupt):
        cp_parts.main([*argv, "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["partial"] and [r[2:4] for r in result["rows"]] == [["op", "fwd"], ["op", "fwd+bwd"]]
    assert result["notes"][-1].startswith("partial: written after 0 of 2 cases (layer, T), plus 2 rows of the next;")
    out = tmp_path / "limit.json"
    monkeypatch.setattr(cp_parts, "_timed_ms", timed)
    assert cp_parts.main([*argv, "--time-limit", "0.5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "partial" not in result and {r[0] for r in result["rows"]} == {"gdn"} and len(result["rows"]) < 4
    assert "--time-limit 0.5 s reached: not run: gla at T 32" in result["notes"]
