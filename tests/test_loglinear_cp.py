"""Log-linear ops under context parallelism: gloo worlds of 2 and 4 CPU processes against one process,
outputs, every rank's final level states and every gradient (q, k, v, g, beta, level_weights), float64.

The single-process reference chains the P shards through initial_state / position_offset (the op's
own decoding form), which also gives the level states after every shard, so the loss can weigh them."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from dist_utils import WorkerError, run_world

OPS = {"gdn": "loglinear_gated_delta_rule", "mamba2": "loglinear_gated_linear_attn"}


def make_inputs(seed, kind, B, T, H, K, V, L):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = {"q": r(B, T, H, K), "k": F.normalize(r(B, T, H, K), dim=-1), "v": r(B, T, H, V),
         "g": -F.softplus(r(B, T, H)) * 0.02}  # slow decays: the levels across ranks weigh in
    if kind == "gdn":
        x["beta"] = torch.sigmoid(r(B, T, H))
    x["level_weights"] = F.softplus(r(B, T, H, L))
    x["do"] = r(B, T, H, V)
    x["W"] = r(B, H, L, K, V)  # weight of every rank's final level states in the loss
    return x


def names(kind):
    return ["q", "k", "v", "g"] + (["beta"] if kind == "gdn" else []) + ["level_weights"]


def cp_worker(rank, P, cases):
    import torch.distributed as dist
    from lctrain.parallel import LogLinearContextParallelOp, context_parallel, loglinear_cp

    from lctrain import kernels

    passes = []   # the CP op's separate transition / state-gradient passes (none where the tree exchanges)

    def counted(name):
        f = getattr(loglinear_cp, name)
        return lambda *a, **kw: passes.append(name) or f(*a, **kw)

    for name in ("shard_transition", "shard_state_grad"):
        setattr(loglinear_cp, name, counted(name))
    out = []
    for seed, kind, B, Tl, H, K, V, L, chunk, *backend in cases:
        flags, backend = backend[1:], backend[:1]
        want_states = "no_state" not in flags
        weigh_states = want_states and "unweighted" not in flags
        passes.clear()
        x = make_inputs(seed, kind, B, P * Tl, H, K, V, L)
        sl = slice(rank * Tl, (rank + 1) * Tl)
        dt = torch.float32 if backend else torch.float64  # the Triton kernels take float32 at most
        t = {n: x[n][:, sl].to(dt).clone().requires_grad_() for n in names(kind)}
        op = context_parallel(getattr(kernels, OPS[kind]), dist.group.WORLD)
        assert isinstance(op, LogLinearContextParallelOp)
        o, s = op(*(t[n] for n in names(kind)), output_final_state=want_states, backend=(backend or ["torch"])[0],
                  chunk_size=chunk)
        assert (s is not None) == want_states
        loss = (o.double() * x["do"][:, sl]).sum()
        (loss + (s.double() * x["W"] * (rank + 1)).sum() if weigh_states else loss).backward()
        out.append(dict(o=o.detach(), state=None if s is None else s.detach(), grads={n: v.grad for n, v in t.items()},
                        passes=list(passes), exchanges=op.exchanges_in_call(t["q"], t["v"], t.get("beta"),
                                                                            (backend or ["torch"])[0], chunk)))
    return out


def reference(case, P):
    from lctrain import kernels
    seed, kind, B, Tl, H, K, V, L, chunk = case[:9]
    x = make_inputs(seed, kind, B, P * Tl, H, K, V, L)
    t = {n: x[n].clone().requires_grad_() for n in names(kind)}
    fn = getattr(kernels, OPS[kind])
    state, outs, states, loss = None, [], [], 0.0
    for r in range(P):
        sl = slice(r * Tl, (r + 1) * Tl)
        o, state = fn(*(t[n][:, sl] for n in names(kind)), initial_state=state, output_final_state=True,
                      position_offset=r * Tl, backend="naive")
        outs.append(o)
        states.append(state)
        loss = loss + (o * x["do"][:, sl]).sum()
        if not {"unweighted", "no_state"} & set(case[9:]):
            loss = loss + (state * x["W"] * (r + 1)).sum()
    loss.backward()
    return torch.cat(outs, 1).detach(), [s.detach() for s in states], {n: v.grad for n, v in t.items()}


def close(a, b, what, tol=1e-10):
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err < tol, f"{what}: relative error {err:.2e}"


def check(P, cases, tol=1e-10, passes=None):
    results = run_world(cp_worker, P, cases, timeout=240)
    if passes is not None:   # which separate passes each rank ran, per case (a list: every rank the same); and
        # exchanges_in_call says beforehand whether it runs none
        want = passes if isinstance(passes, dict) else {r: passes for r in range(P)}
        ran = {r: [res["passes"] for res in results[r]] for r in range(P)}
        assert all(p == want[r] for r in range(P) for p in ran[r]), ran
        assert all(res["exchanges"] == (want[r] == []) for r in range(P) for res in results[r])
    for i, case in enumerate(cases):
        o_ref, s_ref, g_ref = reference(case, P)
        Tl = case[3]
        for r in range(P):
            got = results[r][i]
            sl = slice(r * Tl, (r + 1) * Tl)
            close(got["o"].double(), o_ref[:, sl], f"{case} rank {r} output", tol)
            if got["state"] is not None:
                close(got["state"].double(), s_ref[r], f"{case} rank {r} final level states", tol)
            for n, g in got["grads"].items():
                close(g.double(), g_ref[n][:, sl], f"{case} rank {r} d{n}", tol)


# (seed, kind, B, T_local, H, K, V, L, chunk): level blocks inside a rank, spanning 2 and 4 ranks;
# L one larger than needed (that level's gradient must be zero everywhere: checked through the reference)
def test_cp2_matches_one_process():
    """Outside the transition tree every rank runs the transition pass; the state-gradient pass only where a level's
    block began on an earlier rank (rank 0's G no rank reads)."""
    check(2, [(1, "gdn", 1, 8, 2, 4, 3, 6, 4), (2, "mamba2", 2, 4, 1, 3, 4, 5, 4)],
          passes={0: ["shard_transition"], 1: ["shard_transition", "shard_state_grad"]})


def test_cp4_matches_one_process():
    """Levels spanning 2 and 4 ranks: the state-gradient pass runs per level whose block began on an earlier rank,
    so rank 0 none, rank 2 one (its pair's block starts there), ranks 1 and 3 two."""
    grad = "shard_state_grad"
    check(4, [(3, "gdn", 1, 4, 2, 4, 3, 6, 2), (4, "mamba2", 1, 8, 2, 3, 3, 7, 8)],
          passes={0: ["shard_transition"], 1: ["shard_transition", grad, grad], 2: ["shard_transition", grad],
                  3: ["shard_transition", grad, grad]})


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU runs)")
def test_cp2_fused_triton_matches_one_process():
    """Backend "triton" under CP (float32, interpreter): each rank runs the fused level kernels, whose transition
    tree exchanges the shard maps and the incoming states' gradients (no separate transition or state-gradient
    pass); 128 tokens a rank: levels 7 (inside a rank) and 8 (across). Second case: no loss on the final states, so
    they reach the backward as None (the last rank's exchange then owes them nothing, and says so with None, while
    rank 0's still carries back what rank 1's outputs owe it). Third: no final states asked for (as in training), so
    no rank forms them, and rank 0's gradient still gets rank 1's share through the exchange."""
    check(2, [(6, "gdn", 1, 128, 1, 16, 16, 9, 64, "triton"),
              (5, "gdn", 1, 128, 1, 16, 16, 9, 64, "triton", "unweighted"),
              (4, "gdn", 1, 128, 1, 16, 16, 9, 64, "triton", "no_state")], tol=1e-4, passes=[])


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU runs)")
def test_cp4_fused_triton_matches_one_process():
    """Four ranks of 128 tokens through the fused kernels' transition tree: levels 8 and 9 span 2 and 4 ranks, so
    rank 3's incoming state of level 9 folds the maps of ranks 0-2 taken from their trees, and the gradients of
    rank 1's final states come back from ranks 2-3 (both exchanges inside the fused call)."""
    check(4, [(7, "gdn", 1, 128, 1, 16, 16, 10, 64, "triton")], tol=1e-4, passes=[])


def test_cp_refuses_a_shard_that_is_not_a_power_of_two():
    with pytest.raises(WorkerError, match="power of two"):
        run_world(cp_worker, 2, [(5, "gdn", 1, 6, 1, 4, 4, 6, 2)], timeout=120)


def test_bench_cp_runs_the_loglinear_op_on_cpu(tmp_path):
    """`lctrain bench cp --op loglinear_gated_delta_rule --device cpu`: 2 gloo ranks, JSON written."""
    import json

    from lctrain.bench.cp import COLUMNS, main

    out = tmp_path / "cp.json"
    rc = main(["--device", "cpu", "--nproc", "2", "--T", "16", "--H", "2", "--D", "8", "--chunk-size", "8",
               "--warmup", "0", "--iters", "1", "--op", "loglinear_gated_delta_rule", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    row = dict(zip(COLUMNS, result["rows"][0]))
    assert row["T total"] == 32 and row["CP fwd+bwd ms"] > 0
    assert "loglinear gated delta rule" in result["title"]
