"""Developer tool: time every Triton kernel of the chunk recurrences under many launch settings.

    python -m lctrain.bench.tune_kernels [--T 131072 [16384 ...]] [--D 128] [--methods delta gated_delta gla]
                                         [--kernels dqk wy_bwd ...] [--jobs 16] [--json PATH]
    python -m lctrain.bench.tune_kernels --accuracy-of wy_bwd --T 16384 [--skip-from tune.json]

Each kernel is timed on its own (triton.testing.do_bench, median) on the intermediates of one real
fwd+bwd (B=1, H=16, bf16), for every candidate of a grid of its launch keys (ops.KERNEL_KEYS: each
key tunes one kernel, so kernels are tuned independently). Every candidate's outputs are compared
with the default settings' outputs: a candidate that disagrees (relative error > 2e-2) is reported
as WRONG and never chosen. Compilation, which dominates a sweep, runs first in --jobs worker
processes at a short --compile-T (same specialisations: T and NT stay multiples of 16) and fills
Triton's cache; the timing processes then only load the binaries. Some settings fault the GPU
(illegal address; Triton 3.6 on Hopper, docs/kernels-notes.md): such a candidate is recorded and
skipped, and the sweep goes on in a fresh process.

Agreement with the defaults is not accuracy: `--accuracy-of KERNEL` instead runs a full fwd+bwd per
candidate of KERNEL through the public API and reports the relative error of the output and every
gradient against the chunkwise torch backend in float32.

The timing ``--json`` is rewritten after every kernel timed (marked ``"partial": true`` until the sweep
ends), so a sweep killed by a time limit keeps what it timed.

Prints per kernel and method the default's time, the best candidate and its time, and the sum over
the kernels of one fwd+bwd (state_fwd and wy_apply run twice: forward and backward). New defaults
belong in ops._Cfg only after `pytest -m gpu` and `lctrain bench kernels` agree.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

from lctrain.bench.report import write_json, write_partial

KERNELS = ("wy_solve", "wy_apply", "state_fwd", "output_fwd", "dv_local", "state_bwd", "dqk",
           "wy_bwd")
# How many times one fwd+bwd runs each kernel.
RUNS_PER_STEP = {"wy_apply": 2, "state_fwd": 2}
_NEEDS_W = {"wy_solve", "wy_apply", "wy_bwd"}


def _grid(**axes) -> list[dict]:
    keys = list(axes)
    return [{k: v for k, v in zip(keys, vals) if v is not None}
            for vals in itertools.product(*(axes[k] for k in keys))]


def candidates(kernel: str, K: int, V: int) -> list[dict]:
    """Launch-setting overrides to try for one kernel ({} = the current defaults, always first)."""
    bk = [b for b in (32, 64, 128, 256) if b <= max(K, 16)]
    bv = [b for b in (32, 64, 128, 256) if b <= max(V, 16)]
    grids = {
        "wy_solve": _grid(BKS=bk, warps_solve=[1, 2, 4, 8]),
        "wy_apply": _grid(BKW=bk, BVW=bv, warps_wy=[4, 8]) + _grid(stages_wy=[1, 2, 4]),
        "state_fwd": _grid(BVS=[16, 32, 64], warps_seq=[2, 4, 8], stages_seq=[None, 1, 2]),
        "output_fwd": _grid(BVO=bv, warps_out=[2, 4, 8]),
        "dv_local": _grid(BVP=bv, warps_dv=[2, 4, 8]),
        "state_bwd": _grid(BVSB=[16, 32, 64], warps_seqb=[4, 8], stages_seqb=[None, 1, 2]),
        "dqk": _grid(BKD=bk, BVD=bv, warps_dqk=[4, 8], stages_dqk=[None, 2]),
        "wy_bwd": _grid(BKB=[b for b in bk if b <= 64], BVB=[b for b in bv if b <= 64],
                        warps_wyb=[4, 8], stages_wyb=[None, 1, 2]),
    }
    out = [{}]
    for c in grids[kernel]:
        if c not in out:
            out.append(c)
    return out


def _label(c: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in c.items()) or "default"


class _Problem:
    """Inputs and default-setting intermediates of one fwd+bwd of `method`; run(kernel, cfg)
    launches one kernel under cfg and returns its outputs."""

    def __init__(self, method: str, T: int, D: int, H: int = 16, seed: int = 0,
                 device: str = "cuda", dtype_name: str = "bfloat16"):
        import torch

        from lctrain.kernels.triton import ops
        self.ops, self.torch = ops, torch
        gen = torch.Generator(device=device).manual_seed(seed)
        dt = getattr(torch, dtype_name)

        def rnd(*shape):
            return torch.randn(*shape, device=device, generator=gen)

        B = 1
        q = rnd(B, T, H, D).to(dt)
        k = torch.nn.functional.normalize(rnd(B, T, H, D), dim=-1).to(dt)
        v = rnd(B, T, H, D).to(dt)
        do = rnd(B, T, H, D).to(dt)
        g = (torch.nn.functional.logsigmoid(rnd(B, T, H)) / 16) if method != "delta" else None
        beta = torch.sigmoid(rnd(B, T, H)) if method != "gla" else None
        self.q, self.k, self.v, self.do, self.g, self.beta = q, k, v, do, g, beta
        self.scale = D ** -0.5
        self.K = self.V = D
        self.gated = g is not None
        cfg = self.cfg()
        with torch.no_grad():
            self.gam, self.tm = ops._wy_solve(k, g, beta, cfg)
            self.w, ut = ops._wy_apply(k, v, beta, self.gam, self.tm, cfg)
            self.u = ut if self.w is not None else v
            self.h, self.vnew, _, _ = ops._state_fwd(k, self.w, self.u, self.gam, None, cfg,
                                                     store_h=True, store_vnew=True,
                                                     store_final=False)
            self.dvl = ops._dv_local(q, k, do, self.gam, self.scale, cfg)
            self.dh, self.du, _ = ops._state_bwd(q, k, self.w, do, self.dvl, self.gam, None,
                                                 self.scale, cfg, store=True)
            self.dq, self.dk, self.dw, self.dgam = ops._dqk(
                q, k, self.vnew, do, self.h, self.dh, self.du if beta is not None else None,
                self.gam, self.scale, cfg)
        self.dk_work = self.dk.clone()  # wy_bwd completes dk in place: timing runs use a scratch

    def cfg(self, overrides: dict | None = None):
        return self.ops._Cfg(self.K, self.V, overrides, gated=self.gated)

    def kernels(self) -> list[str]:
        return [n for n in KERNELS if self.beta is not None or n not in _NEEDS_W]

    def run(self, kernel: str, cfg, *, fresh: bool = False):
        ops, s = self.ops, self
        if kernel == "wy_solve":
            return ops._wy_solve(s.k, s.g, s.beta, cfg)
        if kernel == "wy_apply":
            return ops._wy_apply(s.k, s.v, s.beta, s.gam, s.tm, cfg)
        if kernel == "state_fwd":
            return ops._state_fwd(s.k, s.w, s.u, s.gam, None, cfg, store_h=True, store_vnew=True,
                                  store_final=False)[:2]
        if kernel == "output_fwd":
            return ops._output_fwd(s.q, s.k, s.vnew, s.h, s.gam, s.scale, cfg)
        if kernel == "dv_local":
            return ops._dv_local(s.q, s.k, s.do, s.gam, s.scale, cfg)
        if kernel == "state_bwd":
            return ops._state_bwd(s.q, s.k, s.w, s.do, s.dvl, s.gam, None, s.scale, cfg,
                                  store=True)[:2]
        if kernel == "dqk":
            return ops._dqk(s.q, s.k, s.vnew, s.do, s.h, s.dh,
                            s.du if s.beta is not None else None, s.gam, s.scale, cfg)
        if kernel == "wy_bwd":
            dk = s.dk.clone() if fresh else s.dk_work
            dv, dbeta, dg = ops._wy_bwd(s.k, s.v, s.beta, s.gam, s.tm, s.dw, s.du, dk, s.dgam, cfg)
            return dk, dv, dbeta, dg
        raise ValueError(kernel)


def _flat(x) -> list:
    if x is None:
        return []
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flat(item)]
    return [x]


def _rel_err(a, b) -> float:
    """Worst relative difference over the tensors of two (nested) kernel outputs."""
    from .kernels import _rel_diff
    return max((_rel_diff(x, y) for x, y in zip(_flat(a), _flat(b))), default=0.0)


def _compile_worker(args):
    """Compile (launch once at a short T, then synchronize) candidates of one method.

    Returns (failures, rest): a candidate that fails to compile is recorded and the next one tried;
    one that faults on the GPU (an illegal address poisons the whole CUDA context) is recorded and
    the worker stops, handing back the candidates it did not reach for a fresh process."""
    method, T, D, jobs = args
    prob = _Problem(method, T, D)
    failures = []
    for i, (kernel, cand) in enumerate(jobs):
        try:
            prob.run(kernel, prob.cfg(cand), fresh=True)
            prob.torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported per candidate, never fatal to the sweep
            failures.append((method, kernel, _label(cand), f"{type(e).__name__}: {str(e)[:200]}"))
            try:
                prob.torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - the context is gone: let a new process go on
                return failures, (method, T, D, jobs[i + 1:]) if jobs[i + 1:] else None
    return failures, None


def precompile(methods, kernels, T: int, D: int, jobs: int, log=print) -> list:
    """Fill Triton's cache with every candidate, `jobs` processes in parallel (a fresh process per
    piece of work, so a candidate that faults cannot take others down). Returns the failures as
    (method, kernel, label, error)."""
    import multiprocessing as mp
    work = []
    for m in methods:
        todo = [(kn, c) for kn in kernels if not (m == "gla" and kn in _NEEDS_W)
                for c in candidates(kn, D, D)]
        per = 8  # small pieces keep the pool busy to the end (each piece sets up its own problem)
        work += [(m, T, D, todo[i:i + per]) for i in range(0, len(todo), per)]
    failures: list = []
    with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        while work:
            again = []
            for fails, rest in pool.imap_unordered(_compile_worker, work):
                for f in fails:
                    log("  candidate failed: " + " ".join(f))
                failures += fails
                if rest:
                    again.append(rest)
            work = again
    return failures


def _timer(device: str, warmup: int, rep: int):
    """ms per call: do_bench's median on a GPU; a wall-clock mean elsewhere (interpreter tests)."""
    if device == "cuda":
        import triton
        return lambda fn: triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")

    def wall(fn):
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    return wall


class GpuFault(Exception):
    """A candidate left the CUDA context unusable; the sweep goes on in a fresh process."""


def _context_alive(torch) -> bool:
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def tune(methods, kernels, T: int, D: int, warmup: int, rep: int, log=print, *, H: int = 16,
         device: str = "cuda", dtype_name: str = "bfloat16", grid=candidates,
         skip: dict | None = None, done: dict | None = None, save=None) -> dict:
    """Time every candidate of every kernel; returns {method: {kernel: {default_ms, best, rows}}}.

    skip = {(method, kernel, label): why} is not run (failed in precompile, or faulted the GPU in an
    earlier process); done = results of an earlier process, kept; save(results) is called after
    each kernel. A candidate that faults the GPU raises GpuFault((method, kernel, label))."""
    import torch
    timer = _timer(device, warmup, rep)
    results: dict = {m: dict((done or {}).get(m, {})) for m in methods}
    skip = skip or {}
    for m in methods:
        todo = [kn for kn in kernels if kn not in results[m]
                and (kn not in _NEEDS_W or m != "gla")]
        if not todo:
            continue
        prob = _Problem(m, T, D, H=H, device=device, dtype_name=dtype_name)
        for kernel in todo:
            ref = prob.run(kernel, prob.cfg(), fresh=True)
            rows = []
            for cand in grid(kernel, D, D):
                cfg = prob.cfg(cand)
                why = skip.get((m, kernel, _label(cand)))
                if why:
                    rows.append({"cfg": cand, "ms": None, "error": why, "ok": False})
                    continue
                try:
                    err = _rel_err(prob.run(kernel, cfg, fresh=True), ref)
                    ms = timer(lambda p=prob, kn=kernel, c=cfg: p.run(kn, c))
                    if device == "cuda":
                        torch.cuda.synchronize()
                    rows.append({"cfg": cand, "ms": round(ms, 4), "rel_err": float(f"{err:.2e}"),
                                 "ok": err <= 2e-2})
                except Exception as e:  # noqa: BLE001
                    if device == "cuda" and not _context_alive(torch):
                        raise GpuFault((m, kernel, _label(cand))) from e
                    rows.append({"cfg": cand, "ms": None, "error": f"{type(e).__name__}: {str(e)[:160]}",
                                 "ok": False})
            good = [r for r in rows if r["ok"] and r["ms"] is not None]
            best = min(good, key=lambda r: r["ms"]) if good else None
            results[m][kernel] = {"default_ms": rows[0]["ms"], "best": best, "rows": rows}
            log(f"{m:12s} {kernel:11s} default {rows[0]['ms']} ms  best {best and best['ms']} ms "
                f"[{best and _label(best['cfg'])}]  ({len(rows)} candidates, "
                f"{sum(not r['ok'] for r in rows)} wrong/failed)")
            if save:
                save(results)
        prob = None  # free the problem's tensors before the next method's
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def accuracy(methods, kernel: str, T: int, D: int, H: int = 16, skip: set | None = None,
             log=print) -> dict:
    """Relative error of the output and every input gradient of one full fwd+bwd (public API,
    bf16) against the chunkwise torch backend in float32 on the same inputs, for each candidate of
    `kernel` (the others at their defaults). Candidates in `skip` {(method, label)} are left out."""
    import torch

    from lctrain.kernels.triton import ops

    from .kernels import _float32_inputs, _grad_names, _make_inputs, _outputs_and_grads, _rel_diff
    out: dict = {}
    for m in methods:
        x = _make_inputs(1, T, H, D, torch.bfloat16, "cuda")
        ref = _outputs_and_grads("ref_" + m, _float32_inputs(x), None)
        names = _grad_names(m)
        out[m] = []
        for cand in candidates(kernel, D, D):
            if skip and (m, _label(cand)) in skip:
                continue
            previous = ops.set_config(**cand)
            try:
                errs = [_rel_diff(a, b) for a, b in zip(_outputs_and_grads(m, x, None), ref)]
            finally:
                ops.set_config(**previous)
            row = {"cfg": cand, "max_rel_err": max(errs), **{n: float(f"{e:.2e}") for n, e in zip(names, errs)}}
            out[m].append(row)
            log(f"{m:12s} {kernel} {_label(cand):45s} max {max(errs):.2e}  "
                + " ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)))
    return out


def summary(results: dict) -> str:
    lines = ["method        kernel       default_ms  best_ms  best settings"]
    for m, per in results.items():
        tot_d = tot_b = 0.0
        for kernel, r in per.items():
            n = RUNS_PER_STEP.get(kernel, 1)
            b = r["best"]
            tot_d += n * (r["default_ms"] or 0)
            tot_b += n * (b["ms"] if b else r["default_ms"] or 0)
            lines.append(f"{m:13s} {kernel:12s} {r['default_ms']!s:>10}  {b and b['ms']!s:>7}  "
                         f"{b and _label(b['cfg'])}")
        lines.append(f"{m:13s} {'SUM fwd+bwd':12s} {tot_d:10.3f}  {tot_b:7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lctrain.bench.tune_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[131072], help="one or more lengths")
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["delta", "gated_delta", "gla"],
                   choices=["delta", "gated_delta", "gla"])
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                   help="compile processes (0: compile while timing)")
    p.add_argument("--compile-T", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=20, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=80, help="do_bench measuring time, ms")
    p.add_argument("--json", default=None)
    p.add_argument("--accuracy-of", default=None, choices=list(KERNELS),
                   help="instead of timing: error of a full fwd+bwd against the float32 torch "
                        "backend for each candidate of this kernel (at the first --T)")
    p.add_argument("--skip-from", default=None,
                   help="a --json of an earlier timing run: leave out its failed/faulted candidates")
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)  # internal: a timing child
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for name, n in [("--T", t) for t in args.T] + [("--compile-T", args.compile_T)]:
        if n % 1024:
            p.error(f"{name}={n}: use a multiple of 1024 (so T and the chunk count keep the same "
                    "divisibility as the timed problem, and the compiled kernels are reused)")
    import torch
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use python -m lctrain.bench.kernel_resources to check a config "
                "without one)")
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.accuracy_of:
        skip = set()
        if args.skip_from:
            with open(args.skip_from) as f:
                skip = {(e[0], e[2]) for e in json.load(f)["skipped"] if e[1] == args.accuracy_of}
        res = accuracy(args.methods, args.accuracy_of, args.T[0], args.D, skip=skip, log=log)
        if args.json:
            write_json({"T": args.T[0], "D": args.D, "kernel": args.accuracy_of, "gpu": torch.cuda.get_device_name(),
                        "date": time.strftime("%Y-%m-%d"), "accuracy": res}, args.json)
        return 0
    if args.state:
        return _timing_child(args, log)
    # Parent: compile in parallel, then time in child processes; a child that faults the GPU
    # records the candidate in the state file and exits with 3, and the next child skips it.
    import subprocess
    import tempfile
    t0 = time.time()
    errors = precompile(args.methods, args.kernels, args.compile_T, args.D, args.jobs, log) if args.jobs else []
    log(f"compiled in {time.time() - t0:.0f} s; {len(errors)} candidates failed")
    fd, state_path = tempfile.mkstemp(suffix=".json", prefix="tune_state_")
    with os.fdopen(fd, "w") as f:
        json.dump({"skip": [[*e[:3], "failed in precompile: " + e[3]] for e in errors],
                   "results": {}}, f)
    argv = sys.argv[1:] if argv is None else argv
    for _ in range(50):
        rc = subprocess.call([sys.executable, "-m", "lctrain.bench.tune_kernels", *argv,
                              "--state", state_path])
        if rc != 3:
            return rc
    log("gave up: 50 processes faulted the GPU")
    return 1


def _timing_child(args, log) -> int:
    import torch
    with open(args.state) as f:
        state = json.load(f)

    def payload(results: dict) -> dict:
        return {"T": args.T, "D": args.D, "gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                "skipped": state["skip"], "results": results}

    def save(T, res):
        state["results"][str(T)] = res
        write_json(state, args.state)
        # the sweep so far (this and earlier processes), in case the run is killed before the end: the lengths
        # done (each process runs them all again, those done in an earlier one at once) and part of T
        if args.json:
            write_partial(payload({str(t): state["results"][str(t)] for t in args.T if str(t) in state["results"]}),
                          args.json, len(results), len(args.T), "lengths, plus part of the next")

    skip = {tuple(e[:3]): e[3] for e in state["skip"]}
    t1 = time.time()
    results = {}
    for T in args.T:
        log(f"--- T={T}")
        try:
            results[T] = tune(args.methods, args.kernels, T, args.D, args.warmup, args.rep,
                              log=log, skip=skip, done=state["results"].get(str(T)),
                              save=lambda res, T=T: save(T, res))
        except GpuFault as e:
            log(f"  candidate faulted the GPU at T={T}: {' '.join(e.args[0])}; going on in a new process")
            state["skip"].append([*e.args[0], f"faulted the GPU (illegal address) at T={T}"])
            save(T, state["results"].get(str(T), {}))
            return 3
    print(f"timed in {time.time() - t1:.0f} s")
    for T, r in results.items():
        print(f"\n=== T={T}, D={args.D}\n" + summary(r))
    if args.json:
        write_json(payload({str(T): r for T, r in results.items()}), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
