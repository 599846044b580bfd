"""Where do the Triton chunk kernels go wrong on a GPU? A grid of cases (mixer x head dims x layout x dtype x
launch setting), each compared with the chunkwise torch backend in float64 on the same device: the relative
error of the output, the final state and every gradient, or FAULT when the case took its process down (an
illegal memory access). ``python -m lctrain.bench.kernel_check --json X.json [--jobs 12] [--quick]``

Besides fresh tensors, the grid replays how the log-linear ops call the plain ops (``REPLAY`` layouts: one
partial chunk, no initial state, q passed as k, views at an offset into a longer tensor, many short batch rows,
inputs whose data pointers are not 16-byte aligned), and ``--loglinear`` adds the log-linear ops themselves at
the shape of ``test_fused_triton_gpu_long_and_wide`` (issue 18, docs/loglinear.md).

Every group of cases (one mixer and head-dim shape) runs in its own subprocess with CUDA_LAUNCH_BLOCKING=1,
so a fault is pinned on the case (and the launch, in its log) that caused it and does not poison the other
groups; after a fault the group's remaining cases run in a fresh process. Used for the GPU failures of
2026-11-30 (docs/kernels-notes.md): packed documents at head dims 16/20 with wrong dq/dk, an illegal access in
the forward state pass at head dim 64 and T=20000, a float32 fault at head dim 128. ``--time-limit`` (default
240 s) bounds the whole grid; the JSON is rewritten as groups finish (marked ``"partial": true`` until the end,
lctrain.bench.report.write_partial), so a run killed from outside keeps the groups it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

KINDS = ("delta", "gated_delta", "gla")
DIMS = ((2, 16, 20), (2, 32, 32), (4, 64, 64), (2, 128, 128))   # (H, K, V)
LAYOUTS = {"T200": dict(B=2, T=200), "T4133": dict(B=2, T=4133), "T20000": dict(B=1, T=20000),
           "docs": dict(B=1, lengths=[7, 1, 64, 77, 300, 1000, 129])}
# How chunk.py's level runs call the plain op (docs/loglinear.md, issue 18): at T=20000, H=2 the composed backend's
# first Triton call, the one that faulted on an H200, is the last 32 tokens (one partial chunk, NT=1) as a view
# at token 19968, no initial state, output_final_state, its k passed as q; then blocks of 2^l tokens reshaped to
# B * nb rows (156 x 128 at level 7). Keys besides B / T: ``offset`` (the inputs are views starting this many
# tokens into B=1 tensors of offset + T + 5 tokens), ``init`` (False: no initial state), ``q_is_k`` (k passed as
# q too), ``shift`` (every input, the initial state and the output gradients dO / dS a view one element into its
# own buffer: data pointers not 16-byte aligned).
REPLAY = {
    "T32": dict(B=1, T=32),                                                  # NT=1 alone (an int 1 Triton specialises)
    "T32_noinit": dict(B=1, T=32, init=False),                                # ... and no initial state
    "T200_noinit": dict(B=2, T=200, init=False),                              # no initial state alone
    "lastblock": dict(B=1, T=32, offset=19968, init=False, q_is_k=True),      # the faulting call, as made
    "lastblock64": dict(B=1, T=64, offset=4032, init=False, q_is_k=True),     # the same at T=4096 (one full chunk)
    "blocks128": dict(B=156, T=128, init=False),                              # level 7's B * nb rows
    "T544_offset": dict(B=1, T=544, offset=19456, init=False),                # a level's last partial run
    "shift": dict(B=2, T=200, shift=True),                                    # unaligned pointers
    "shift_T32": dict(B=1, T=32, shift=True, init=False),
}
LAYOUTS.update(REPLAY)
VARIANTS = {"default": {}, "stages3": {"stages_seq": 3, "stages_seqc": 3}, "direct_pt": {"direct_pt": 1},
            "stages_dqk1": {"stages_dqk": 1},
            # the "shift" layouts with ops.ALIGN_INPUTS off: the kernels then get the unaligned pointers themselves
            "unaligned": {}}


def grid(quick: bool) -> list[dict]:
    cases = []
    for kind in KINDS:
        for dims in DIMS:
            for layout in ("T200", "docs", "T4133", "T20000"):
                for dtype in ("bfloat16", "float32", "float16"):
                    if dtype == "float16" and (layout == "T20000" or dims[1] < 32):
                        continue
                    only_default = dtype != "bfloat16" or quick or layout == "T20000"
                    variants = ["default"] if only_default else [v for v in VARIANTS if v != "unaligned"]
                    if layout == "T20000" and dtype == "float32":
                        continue
                    for var in variants:
                        cases.append(dict(kind=kind, dims=list(dims), layout=layout, dtype=dtype, variant=var))
            for layout in REPLAY if dims[1] >= 32 else ():   # head dims below 32 are refused on GPUs
                for dtype in ("bfloat16", "float32") if dims[1] <= 64 else ("bfloat16",):  # fp32 > 64: refused
                    for var in ["default"] + (["unaligned"] if LAYOUTS[layout].get("shift") else []):
                        cases.append(dict(kind=kind, dims=list(dims), layout=layout, dtype=dtype, variant=var))
    return cases


# --loglinear: test_fused_triton_gpu_long_and_wide's cases (B=1, H=2, bf16 q/k/v, fp32 g/beta/lambda, from
# position 0, no initial state, output_final_state) against the torch backend in float32; each backend in its
# own process so that a fault is pinned on it
LOGLINEAR_KINDS = ("ll_gdn", "ll_mamba2")
LOGLINEAR_SHAPES = ((20000, 64), (4096, 128))   # (T, D)


def loglinear_grid() -> list[dict]:
    return [dict(kind=kind, dims=[2, D, D], layout=f"T{T}", dtype="bfloat16", variant=backend)
            for kind in LOGLINEAR_KINDS for T, D in LOGLINEAR_SHAPES for backend in ("triton", "triton_composed")]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _placed(t, lay: dict, dev: str):
    """t [B, T, ...] on ``dev`` as the layout hands it to the op: a fresh tensor, a view ``offset`` tokens into a
    longer B=1 tensor, or (``shift``) a contiguous view one element into a buffer (a data pointer that is not
    16-byte aligned)."""
    import torch
    if lay.get("offset"):
        a, n = lay["offset"], t.shape[1]
        t = torch.cat([t.new_zeros(1, a, *t.shape[2:]), t, t.new_zeros(1, 5, *t.shape[2:])], dim=1).to(dev)[:, a:a + n]
    else:
        t = t.to(dev)
    if lay.get("shift"):
        buf = t.new_empty(t.numel() + 1)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        t = view
    return t


def run_case(case: dict) -> dict:
    if case["kind"] in LOGLINEAR_KINDS:
        return run_loglinear_case(case)
    import torch
    import torch.nn.functional as F

    from lctrain import kernels
    from lctrain.kernels.triton import ops

    kind, (H, K, V), lay = case["kind"], case["dims"], LAYOUTS[case["layout"]]
    dtype = getattr(torch, case["dtype"])
    B = lay["B"]
    lengths = lay.get("lengths")
    T = sum(lengths) if lengths else lay["T"]
    N = len(lengths) if lengths else B
    gen = torch.Generator().manual_seed(7 * T + K + len(kind))
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = dict(q=r(B, T, H, K), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V),
             g=F.logsigmoid(r(B, T, H) + 3.0) if kind != "delta" else None,
             beta=torch.sigmoid(r(B, T, H)) if kind != "gla" else None,
             initial_state=r(N, H, K, V) if lay.get("init", True) else None)
    if lay.get("q_is_k"):
        x["q"] = None
    dev = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: the Triton interpreter (a smoke test)
    do, dS = r(B, T, H, V).to(dev), r(N, H, K, V).to(dev)
    cu = None
    if lengths:
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=dev)
    op = {"delta": kernels.delta_rule, "gated_delta": kernels.gated_delta_rule, "gla": kernels.gated_linear_attn}[kind]

    def outputs(backend, dt):
        # leaves: the fresh tensors the gradients are taken of; the op gets them as the layout places them
        leaves = {n: t.to(dev).to(torch.float32 if n in ("g", "initial_state") and dt != torch.float64 else dt)
                  .requires_grad_() for n, t in x.items() if t is not None}
        # (shift: the initial state and the output gradients dO, dS misaligned too, as autograd may hand them over)
        unshifted = {"shift": lay.get("shift")}
        placed = {n: _placed(t, lay if n != "initial_state" else unshifted, dev) for n, t in leaves.items()}
        if "q" not in placed:
            placed["q"] = placed["k"]
        args = [placed["q"], placed["k"], placed["v"]] + [placed[n] for n in ("g", "beta") if n in placed]
        o, S = op(*args, initial_state=placed.get("initial_state"), output_final_state=True, backend=backend,
                  cu_seqlens=cu)
        # the gradients of sum(o * do) + sum(S * dS) (do / dS in o's / S's dtype, as autograd would cast them)
        grads = torch.autograd.grad([o, S], list(leaves.values()),
                                    [_placed(do.to(o.dtype), unshifted, dev), _placed(dS.to(S.dtype), unshifted, dev)])
        if dev == "cuda":
            torch.cuda.synchronize()
        return o.detach(), S.detach(), dict(zip(leaves, grads))

    previous, aligning = ops.set_config(**VARIANTS[case["variant"]]), ops.ALIGN_INPUTS
    ops.ALIGN_INPUTS = case["variant"] != "unaligned"
    try:
        o, S, g = outputs("triton", dtype)
    finally:
        ops.set_config(**previous)
        ops.ALIGN_INPUTS = aligning
    ro, rS, rg = outputs("torch", torch.float64)
    err = {"o": _rel(o, ro), "state": _rel(S, rS)}
    err.update({"d" + n: _rel(g[n], rg[n]) for n in rg})
    return err


def run_loglinear_case(case: dict) -> dict:
    """One backend ("variant") of a log-linear op in bf16 against the torch backend in float32, as
    tests/test_loglinear_kernels.py::test_fused_triton_gpu_long_and_wide runs it."""
    import torch
    import torch.nn.functional as F

    from lctrain import kernels

    (H, D, _), T = case["dims"], int(case["layout"][1:])
    B = 1
    L = kernels.levels_needed(T)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(T + D)
    r = lambda *s: torch.randn(*s, generator=gen).to(dev)  # noqa: E731
    x = dict(q=r(B, T, H, D), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D), g=F.logsigmoid(r(B, T, H) + 3.0),
             beta=torch.sigmoid(r(B, T, H)) if case["kind"] == "ll_gdn" else None, lam=F.softplus(r(B, T, H, L)))
    do, dS = r(B, T, H, D).double(), r(B, H, L, D, D).double()

    def outputs(backend, low):
        leaves = {n: (t.to(getattr(torch, case["dtype"])) if low and n in "qkv" else t).detach().clone()
                  .requires_grad_() for n, t in x.items() if t is not None}
        kw = dict(output_final_state=True, backend=backend, chunk_size=64)
        if case["kind"] == "ll_gdn":
            o, S = kernels.loglinear_gated_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["g"],
                                                      leaves["beta"], leaves["lam"], **kw)
        else:
            o, S = kernels.loglinear_gated_linear_attn(leaves["q"], leaves["k"], leaves["v"], leaves["g"],
                                                       leaves["lam"], **kw)
        loss = (o.double() * do).sum() + (S.double() * dS).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        if dev == "cuda":
            torch.cuda.synchronize()
        return o.detach(), S.detach(), dict(zip(leaves, grads))

    o, S, g = outputs(case["variant"], True)
    ro, rS, rg = outputs("torch", False)
    err = {"o": _rel(o, ro), "state": _rel(S, rS)}
    err.update({"d" + n: _rel(g[n], rg[n]) for n in rg})
    return err


def worker() -> None:
    """Reads cases (JSON lines) from stdin; prints START i before and RESULT i {...} after each."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    for line in sys.stdin:
        item = json.loads(line)
        print(f"START {item['i']}", flush=True)
        t0 = time.time()
        try:
            err = run_case(item["case"])
            print("RESULT " + json.dumps({"i": item["i"], "err": err, "s": round(time.time() - t0, 2)}), flush=True)
        except Exception as e:  # a Python-level error (a refusal, a shape check): reported, the worker goes on
            msg = f"{type(e).__name__}: {e}"
            if "CUDA error" in msg or "Triton Error [CUDA]" in msg:  # not a refusal that names the fault
                print("RESULT " + json.dumps({"i": item["i"], "fault": msg[:300]}), flush=True)
                sys.exit(3)
            print("RESULT " + json.dumps({"i": item["i"], "error": msg[:300]}), flush=True)


def run_group(items: list[dict], log, timeout: float) -> dict[int, dict]:
    """Runs items in worker processes until every one has a result; a case whose worker died is a FAULT."""
    results: dict[int, dict] = {}
    todo = list(items)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    deadline = time.time() + timeout
    while todo and time.time() < deadline:
        p = subprocess.Popen([sys.executable, "-m", "lctrain.bench.kernel_check", "--worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        payload = "".join(json.dumps(it) + "\n" for it in todo)
        killed = False
        try:
            out, _ = p.communicate(payload, timeout=max(5.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            killed = True
        log.write(out)
        started = None
        for line in out.splitlines():
            if line.startswith("START "):
                started = int(line.split()[1])
            elif line.startswith("RESULT "):
                res = json.loads(line[7:])
                results[res["i"]] = res
                started = None
        if started is not None and started not in results:
            tail = "\n".join(out.splitlines()[-6:])
            results[started] = ({"i": started, "error": "time limit (killed while running)"} if killed else
                                {"i": started, "fault": f"process died (exit {p.returncode}): " + tail[-400:]})
        done_now = len(todo) - len([it for it in todo if it["i"] not in results])
        todo = [it for it in todo if it["i"] not in results]
        if killed or not done_now:  # the time limit, or a worker that dies before its first case
            break
    for it in todo:
        results[it["i"]] = {"i": it["i"], "error": "not run (time limit)"}
    return results


def case_groups(items: list[dict]) -> list[list[dict]]:
    """The worker processes' shares of the grid, in the order they start: one per mixer, head dims, dtype and
    variant (a log-linear case alone). Cases of different dtypes or variants share no compiled kernel (Triton
    specialises on both), so the split costs only a process start, and the groups run ``--jobs`` at a time
    instead of one long group per mixer running out of time. bfloat16 and the default settings start first: a
    run cut short by its time limit then lacks the cases that matter least."""
    groups: dict[tuple, list] = {}
    for it in items:
        c = it["case"]
        key = (c["kind"], tuple(c["dims"]), c["dtype"], c["variant"]) + \
            ((c["layout"],) if c["kind"] in LOGLINEAR_KINDS else ())
        groups.setdefault(key, []).append(it)
    dtypes = ("bfloat16", "float16", "float32")
    first = sorted(groups, key=lambda k: (k[0] in LOGLINEAR_KINDS, k[3] != "default",
                                          dtypes.index(k[2]) if k[2] in dtypes else 3))
    return [groups[k] for k in first]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default="kernel_check.json")
    p.add_argument("--log", default=None, help="every worker's whole output (default: next to --json)")
    p.add_argument("--jobs", type=int, default=12, help="groups run at once (processes on the GPU)")
    p.add_argument("--quick", action="store_true", help="default launch settings only")
    p.add_argument("--kinds", nargs="+", default=list(KINDS))
    p.add_argument("--layouts", nargs="+", default=None, choices=sorted(LAYOUTS),
                   help="only these layouts of the plain-op grid (default: all)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=("bfloat16", "float16", "float32"),
                   help="only these input dtypes of the plain-op grid (default: all)")
    p.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS),
                   help="only these launch variants of the plain-op grid (default: all that --quick leaves)")
    p.add_argument("--loglinear", action="store_true",
                   help="also the log-linear ops at test_fused_triton_gpu_long_and_wide's shapes (issue 18)")
    p.add_argument("--loglinear-only", action="store_true", help="the log-linear cases alone")
    p.add_argument("--time-limit", type=float, default=240.0, help="seconds for the whole grid")
    p.add_argument("--tol", type=float, default=2e-2, help="bf16 relative error counted as wrong above this")
    a = p.parse_args(argv)
    if a.worker:
        return worker()
    from concurrent.futures import ThreadPoolExecutor, as_completed

    cases = [] if a.loglinear_only else [c for c in grid(a.quick) if c["kind"] in a.kinds
                                         and (a.layouts is None or c["layout"] in a.layouts)
                                         and (a.dtypes is None or c["dtype"] in a.dtypes)
                                         and (a.variants is None or c["variant"] in a.variants)]
    if a.loglinear or a.loglinear_only:
        cases += loglinear_grid()
    items = [{"i": i, "case": c} for i, c in enumerate(cases)]
    log_path = a.log or os.path.splitext(a.json)[0] + ".log"
    from lctrain.bench.report import write_json, write_partial

    t0 = time.time()
    with open(log_path, "w") as log, ThreadPoolExecutor(a.jobs) as pool:
        groups = case_groups(items)
        futures = [pool.submit(run_group, g, log, a.time_limit) for g in groups]
        results = {}
        for n, f in enumerate(as_completed(futures), 1):  # the groups so far, in case of a kill from outside
            results.update(f.result())
            if n < len(futures):
                write_partial({"cases": _rows(items, results, a.tol)}, a.json, n, len(futures), "case groups")
    rows = _rows(items, results, a.tol)
    for r in rows:
        print(f"{r['kind']:12s} H,K,V={tuple(r['dims'])!s:14s} {r['layout']:11s} {r['dtype']:9s} {r['variant']:15s} "
              f"{r['verdict']}")
    bad = [r for r in rows if r["verdict"] != "ok"]
    print(f"kernel_check: {len(rows) - len(bad)} of {len(rows)} cases ok, {len(bad)} not, in {time.time() - t0:.0f} s")
    write_json({"cases": rows}, a.json)


def _rows(items: list[dict], results: dict, tol_bf16: float) -> list[dict]:
    """The JSON's rows of the cases with a result (each with its verdict), in grid order."""
    rows = []
    for it in items:
        if it["i"] not in results:
            continue
        res, c = results[it["i"]], it["case"]
        tol = {"bfloat16": tol_bf16, "float16": tol_bf16 / 2}.get(c["dtype"], 5e-3)
        if "err" in res:
            worst = max(res["err"], key=res["err"].get)
            verdict = "ok" if res["err"][worst] <= tol else f"WRONG {worst} {res['err'][worst]:.3g}"
        else:
            verdict = "FAULT" if "fault" in res else "ERROR " + res.get("error", "")[:120]
        rows.append({**c, **res, "verdict": verdict})
    return rows


if __name__ == "__main__":
    main()
