"""Deltaformer under context parallelism (gloo, 2 and 4 processes) equals one process: outputs and the
gradients of q, k, v, beta; the pipelined schedule (pieces of 2 and 4 tokens on shards of 6, torch and
Triton-interpreter chunk passes) with and without packed documents (random ones, and a document that
reaches across every rank next to documents starting on and just after a shard boundary), and the
gather schedule."""
from __future__ import annotations

import pytest
import torch
from dist_utils import run_world

B, H, K, V, T_LOCAL = 2, 2, 8, 4, 6


def make_case(seed, P, with_docs):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    T = P * T_LOCAL
    x = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V),
             beta=torch.rand(B, T, H, generator=g, dtype=torch.float64), do=r(B, T, H, V))
    docs = None
    if with_docs == "long":  # row 0: a document over all but the last 2 tokens (reaching across every
        # rank); row 1: documents starting exactly at a shard boundary and one token after the next
        docs = torch.zeros(B, T, dtype=torch.long)
        docs[0, T - 2:] = 1
        docs[1, T_LOCAL:] = 1
        docs[1, 2 * T_LOCAL + 1:] = 2
    elif with_docs:  # random documents that cross shard boundaries, different per row
        ends = torch.rand(B, T, generator=g) < 0.25
        docs = torch.cumsum(ends.long(), dim=1) - ends.long()
    return x, docs


def single_process(x, docs):
    from lctrain.kernels.deltaformer import deltaformer_by_documents
    leaves = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "beta")}
    o = deltaformer_by_documents(*leaves.values(), docs, backend="naive")
    grads = torch.autograd.grad((o * x["do"]).sum(), list(leaves.values()))
    return o.detach(), dict(zip(leaves, grads))


def cp_worker(rank, P, cases):
    import torch.distributed as dist
    from lctrain.parallel.deltaformer_cp import deltaformer_cp
    out = []
    for seed, with_docs, backend, schedule, piece in cases:
        x, docs = make_case(seed, P, with_docs)
        if backend == "triton":  # the Triton u-pass computes in float32
            x = {n: t.float() for n, t in x.items()}
        sl = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
        leaves = {n: x[n][:, sl].clone().requires_grad_() for n in ("q", "k", "v", "beta")}
        o = deltaformer_cp(*leaves.values(), dist.group.WORLD, doc_ids=None if docs is None else docs[:, sl],
                           backend=backend, chunk_size=4, schedule=schedule, piece_size=piece)
        (o * x["do"][:, sl]).sum().backward()
        out.append((o.detach(), {n: t.grad for n, t in leaves.items()}))
    model_errors = []
    if P == 2:  # the layer in a hybrid, on the same world: logits and summed parameter gradients
        from test_models import _cp_errors
        model_errors = [_cp_errors(rank, P, "GFSF"),
                        _cp_errors(rank, P, "FSF", separators=(3, 7, 9), document_end_id=63)]
    return out, model_errors


@pytest.mark.parametrize("P", [2, 4])
def test_cp_equals_one_process(P):
    cases = [(12, True, "torch", "pipeline", 4), (18, "long", "torch", "pipeline", 4)]
    if P == 2:  # the other schedule / backend combinations once (CI time; Triton interprets slowly)
        cases += [(15, False, "triton", "pipeline", 4), (17, "long", "triton", "auto", 2),
                  (11, False, "torch", "pipeline", 4), (14, False, "torch", "auto", None),
                  (16, False, "torch", "gather", None), (13, True, "naive", "gather", None)]
    results = run_world(cp_worker, P, cases)
    for _, model_errors in results:
        for out_err, grad_err in model_errors:
            assert out_err < 1e-4 and grad_err < 1e-3
    results = [per_rank for per_rank, _ in results]
    for i, (seed, with_docs, backend, _, _) in enumerate(cases):
        x, docs = make_case(seed, P, with_docs)
        o_ref, g_ref = single_process(x, docs)
        tol = 2e-5 if backend == "triton" else 1e-10
        o = torch.cat([results[r][i][0] for r in range(P)], dim=1).double()
        torch.testing.assert_close(o, o_ref, rtol=tol, atol=tol, msg=f"o, case {i}")
        for n in g_ref:
            g = torch.cat([results[r][i][1][n] for r in range(P)], dim=1).double()
            torch.testing.assert_close(g, g_ref[n], rtol=tol, atol=tol, msg=f"d{n}, case {i}")


def _bench_with_rank1_late(rank, world_size, argv):
    """bench deltaformer-cp's worker where only rank 1's clock runs past --time-limit, from its fourth check
    on (before the second T)."""
    from lctrain.bench import deltaformer_cp, report
    if rank == 1:
        checks = []

        def elapsed(self):
            checks.append(1)
            return 0.0 if len(checks) < 4 else 1e9
        report.Clock.elapsed = elapsed
    return deltaformer_cp._worker(deltaformer_cp._parse(argv), argv)


def test_bench_deltaformer_cp_runs_on_cpu_and_stops_every_rank_at_the_same_case(tmp_path):
    """`lctrain bench deltaformer-cp --device cpu` (its worker on 2 gloo ranks): both schedules, the pipeline's
    per-phase breakdown in the JSON. --time-limit is agreed between ranks: rank 1 alone is past the limit after
    the first T, yet rank 0 skips the second T too (a rank timing it alone would wait in its collectives until
    the timeout); rank 0 writes the final JSON (not partial) naming what was not run."""
    import json

    from lctrain.bench.deltaformer_cp import COLUMNS
    out = tmp_path / "dcp.json"
    argv = ["--device", "cpu", "--T", "32", "64", "--H", "1", "--D", "8", "--chunk-size", "4", "--piece-size", "8",
            "--warmup", "0", "--iters", "1", "--time-limit", "1000", "--json", str(out)]
    assert run_world(_bench_with_rank1_late, 2, argv, init_process_group=False, timeout=180) == [0, 0]
    result = json.loads(out.read_text())
    rows = [dict(zip(COLUMNS, r)) for r in result["rows"]]
    assert [(r["T total"], r["schedule"]) for r in rows] == [(32, "pipeline"), (32, "gather")]
    assert all(r["CP fwd+bwd ms"] > 0 for r in rows)
    phases = result["raw"][0]["pipeline_phase_ms_per_rank"]
    assert len(phases["fwd: local chunk pass"]) == 2 and phases["fwd: wait for earlier u"][0] == 0.0
    assert "partial" not in result and "--time-limit 1000 s reached: not run: T=64 (all)" in result["notes"]
