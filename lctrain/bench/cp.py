"""`lctrain bench cp`: weak scaling of context-parallel gated delta rule, forward + backward.

For each per-rank length T: the plain op on one device at T against ``context_parallel`` over N ranks
at N*T (every rank holds T tokens), so the ideal CP time equals the one-device time and

    weak-scaling efficiency = time(1 device, T) / time(CP = N, N*T)      (target >= 0.85)

Times are medians over iterations of the slowest rank (a CP step ends when its last rank ends); the
one-device time is the same plain op run on every rank at once, averaged over ranks. The state pass
(shard_transition) and state-gradient pass (shard_state_grad) are also timed alone: with the two small
all-gathers they are all that CP adds to the plain op's forward and backward. Peak memory is
the largest per-device peak of one forward+backward. fla-core's own CP (``fla.ops.cp``) is timed side
by side when it can be imported (benchmark-only dependency, never imported by lctrain itself).

Run on N GPUs: ``lctrain bench cp --nproc 2`` (launches torchrun itself; or run it under torchrun).
``--device cpu`` runs the same code on gloo at tiny sizes so that it is exercised without GPUs.
``--json PATH`` writes the result; ``--record`` also appends it to BENCHMARKS.md (lctrain.bench.report).
``--op loglinear_gated_delta_rule`` times the log-linear Gated DeltaNet instead (T per rank a power of
two; level weights L = bit_length(N*T - 1) + 1; its state passes and fla rows are not timed).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import subprocess
import sys
import time

COLUMNS = ["T/rank", "T total", "1-dev fwd ms", "1-dev fwd+bwd ms", "CP fwd ms", "CP fwd+bwd ms", "efficiency",
           "state pass ms", "state-grad pass ms", "1-dev peak MiB", "CP peak MiB", "fla 1-dev fwd+bwd ms", "fla CP fwd+bwd ms", "fla efficiency"]
GPU_DEFAULTS = dict(T=[8192, 16384, 32768, 65536], H=16, D=128, dtype="bf16", chunk_size=64, warmup=5, iters=20)
CPU_DEFAULTS = dict(T=[64, 128], H=2, D=16, dtype="fp32", chunk_size=16, warmup=1, iters=3)


def _parse(argv):
    p = argparse.ArgumentParser(prog="lctrain bench cp", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=None,
                   help="CP ranks to launch (default: all visible GPUs; 2 on CPU); ignored under torchrun")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--T", type=int, nargs="+", default=None, help="tokens per rank (GPU default 8K..64K; CPU 64 128)")
    p.add_argument("--B", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--H", type=int, default=None, help="heads (GPU default 16)")
    p.add_argument("--D", type=int, default=None, help="head dim of q/k and v (GPU default 128)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="GPU default bf16, CPU fp32")
    p.add_argument("--backend", default="auto", help="kernel backend (auto = triton on CUDA, torch on CPU)")
    p.add_argument("--op", choices=["gated_delta_rule", "loglinear_gated_delta_rule"], default="gated_delta_rule",
                   help="the op under CP (default gated_delta_rule)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations")
    p.add_argument("--iters", type=int, default=None, help="timed iterations")
    p.add_argument("--no-fla", action="store_true", help="skip fla-core's CP")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here")
    p.add_argument("--record", nargs="?", const="BENCHMARKS.md", metavar="MD",
                   help="append the result to BENCHMARKS.md (or MD)")
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("B", "H", "D", "chunk_size", "iters"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    bad = [t for t in args.T if t < 1 or t % args.chunk_size]
    if bad:
        p.error(f"--T {bad}: tokens per rank must be positive multiples of --chunk-size {args.chunk_size}")
    bad = [t for t in args.T if args.op.startswith("loglinear") and t & (t - 1)]
    if bad:
        p.error(f"--T {bad}: the log-linear op under CP needs a power of two tokens per rank")
    return args


# ------------------------------------------------------------------------------------------ launching

def _launch(argv: list[str], nproc: int, module: str = "lctrain.bench.cp") -> int:
    """Re-run this command (the module's main) under torchrun with nproc ranks on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *argv]
    print(f"{module}: launching", " ".join(cmd), flush=True)
    env = dict(os.environ, NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"))
    return subprocess.call(cmd, env=env)


def _without_nproc(argv: list[str]) -> list[str]:
    """argv minus --nproc (torchrun would take it for its own --nproc-per-node)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    return run_or_launch(args, argv, "lctrain.bench.cp", _worker)


def run_or_launch(args, argv: list[str], module: str, worker) -> int:
    """Under torchrun: ``worker(args, argv)``; otherwise re-launch ``module`` on --nproc ranks (default:
    every GPU, 2 on CPU)."""
    if "RANK" in os.environ:
        return worker(args, argv)
    nproc = args.nproc
    if nproc is None:
        import torch
        nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    if nproc < 2:
        print(f"{module}: needs >= 2 ranks (got {nproc}); pass --nproc 2 (or more GPUs)", file=sys.stderr)
        return 2
    return _launch(_without_nproc(argv), nproc, module)


def init_worker(device_kind: str):
    """(device, group, world size, rank) of a benchmark rank: its GPU (LOCAL_RANK) and NCCL, or the
    CPU and gloo with the cores shared out between the local ranks."""
    import torch
    import torch.distributed as dist

    if device_kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.group.WORLD, dist.get_world_size(), dist.get_rank()


# ------------------------------------------------------------------------------------------ measuring

def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, group, warmup: int, iters: int, slowest: bool) -> float:
    """Median ms over iterations; per iteration the slowest rank (CP) or the ranks' mean (1-device)."""
    import torch
    import torch.distributed as dist
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, dtype=torch.float64, device=device if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if slowest else dist.ReduceOp.SUM, group=group)
    if not slowest:
        t /= dist.get_world_size(group)
    return statistics.median(t.tolist())


def _peak_mib(fn, device, group) -> float | None:
    import torch
    import torch.distributed as dist
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    peak = torch.tensor([(torch.cuda.max_memory_allocated(device) - base) / 2**20], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return round(peak.item(), 1)


def _inputs(B, T, H, D, dtype, device, seed):
    import torch
    import torch.nn.functional as F
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x = dict(q=r(B, T, H, D).to(dtype), k=F.normalize(r(B, T, H, D), dim=-1).to(dtype), v=r(B, T, H, D).to(dtype),
             g=F.logsigmoid(r(B, T, H) + 3.0), beta=torch.sigmoid(r(B, T, H)).to(dtype))
    for t in x.values():
        t.requires_grad_(True)
    x["do"] = r(B, T, H, D).to(dtype)
    return x


def _pair(fwd, x):
    """(forward-only, forward+backward) closures of a method returning o."""
    import torch
    inputs = [x[n] for n in ("q", "k", "v", "g", "beta")]

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        torch.autograd.grad(fwd(), inputs, x["do"])
    return fwd_only, fwd_bwd


def _fla_methods(x, group, notes):
    """fla-core's one-device and CP gated delta rule as closures, or None with a note why not."""
    try:
        import importlib.metadata as md

        from fla.ops.cp import build_cp_context
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as err:  # noqa: BLE001 - any import failure means "no fla here"
        notes.append(f"fla-core CP not timed: {type(err).__name__}: {err}")
        return None
    if x["q"].shape[0] != 1:
        notes.append("fla-core CP not timed: it takes B == 1 only (varlen layout); rerun with --B 1")
        return None
    import torch
    import torch.distributed as dist
    T = x["q"].shape[1]
    P = dist.get_world_size(group)
    try:
        ctx = build_cp_context(torch.tensor([0, P * T], dtype=torch.long, device=x["q"].device), group=group)
    except Exception as err:  # noqa: BLE001
        notes.append(f"fla-core CP not timed: build_cp_context failed ({type(err).__name__}: {err})")
        return None
    try:
        version = md.version("fla-core")
    except Exception:  # noqa: BLE001
        version = "unknown"
    notes.append(f"fla-core {version}: chunk_gated_delta_rule, CP via fla.ops.cp.build_cp_context")
    args = lambda: (x["q"], x["k"], x["v"], x["g"], x["beta"])  # noqa: E731
    single = lambda: chunk_gated_delta_rule(*args())[0]  # noqa: E731
    cp = lambda: chunk_gated_delta_rule(*args(), cp_context=ctx)[0]  # noqa: E731
    return single, cp, version


def _worker(args, argv) -> int:
    import torch
    import torch.distributed as dist

    from lctrain import kernels
    from lctrain.kernels import levels_needed, shard_state_grad, shard_transition
    from lctrain.parallel import context_parallel

    device, group, P, rank = init_worker(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    kw = dict(backend=args.backend, chunk_size=args.chunk_size)
    op = getattr(kernels, args.op)
    loglinear = args.op.startswith("loglinear")
    cp_op = context_parallel(op, group)
    notes = [f"op {args.op}, B={args.B}, H={args.H}, head dim {args.D}, {args.dtype}, backend {args.backend}, chunk {args.chunk_size}, "
             f"{args.warmup} warm-up + {args.iters} timed iterations; efficiency = 1-device fwd+bwd at T / CP fwd+bwd at {P}*T"]
    rows, raw = [], []
    fla_version = None
    try:
        for T in args.T:
            x = _inputs(args.B, T, args.H, args.D, dtype, device, seed=1000 * rank + T)
            extra = ()
            if loglinear:  # weights for the whole CP sequence; the 1-device run uses its first levels
                lam = torch.nn.functional.softplus(torch.randn(args.B, T, args.H, levels_needed(P * T), device=device))
                extra = (lam.requires_grad_(True),)
            plain = lambda: op(x["q"], x["k"], x["v"], x["g"], x["beta"], *extra, **kw)[0]  # noqa: E731
            cp = lambda: cp_op(x["q"], x["k"], x["v"], x["g"], x["beta"], *extra, **kw)[0]  # noqa: E731
            res = {"T_per_rank": T, "T_total": P * T}
            for name, fwd, slowest in (("single", plain, False), ("cp", cp, True)):
                f_only, f_bwd = _pair(fwd, x)
                res[f"{name}_fwd_ms"] = _timed(f_only, device, group, args.warmup, args.iters, slowest)
                res[f"{name}_fwd_bwd_ms"] = _timed(f_bwd, device, group, args.warmup, args.iters, slowest)
                res[f"{name}_peak_mib"] = _peak_mib(f_bwd, device, group)
            res["efficiency"] = res["single_fwd_bwd_ms"] / res["cp_fwd_bwd_ms"]
            # CP's own compute, local and without communication: where the overhead comes from
            trans = lambda: shard_transition("gated_delta", x["k"], x["v"], g=x["g"], beta=x["beta"], **kw)  # noqa: E731
            sgrad = lambda: shard_state_grad("gated_delta", x["q"], x["k"], x["do"], g=x["g"], beta=x["beta"], **kw)  # noqa: E731
            res["state_pass_ms"] = _timed(trans, device, group, args.warmup, args.iters, False)
            res["state_grad_pass_ms"] = None if loglinear else _timed(sgrad, device, group, args.warmup, args.iters, False)
            res["fla_single_fwd_bwd_ms"] = res["fla_cp_fwd_bwd_ms"] = res["fla_efficiency"] = None
            if loglinear:
                pass  # fla-core has no CP for its log-linear op
            elif not args.no_fla and device.type == "cuda":
                fla = _fla_methods(x, group, notes if T == args.T[0] else [])
                if fla is not None:
                    fla_version = fla[2]
                    try:
                        res["fla_single_fwd_bwd_ms"] = _timed(_pair(fla[0], x)[1], device, group, args.warmup, args.iters, False)
                        res["fla_cp_fwd_bwd_ms"] = _timed(_pair(fla[1], x)[1], device, group, args.warmup, args.iters, True)
                        res["fla_efficiency"] = res["fla_single_fwd_bwd_ms"] / res["fla_cp_fwd_bwd_ms"]
                    except Exception as err:  # noqa: BLE001 - report, keep our own figures
                        notes.append(f"fla-core at T/rank={T} failed: {type(err).__name__}: {str(err)[:200]}")
            elif T == args.T[0]:
                notes.append("fla-core CP not timed: " + ("--no-fla" if args.no_fla else "it needs CUDA"))
            raw.append(res)
            rows.append([T, P * T] + [_round(res[k]) for k in (
                "single_fwd_ms", "single_fwd_bwd_ms", "cp_fwd_ms", "cp_fwd_bwd_ms", "efficiency", "state_pass_ms",
                "state_grad_pass_ms", "single_peak_mib",
                "cp_peak_mib", "fla_single_fwd_bwd_ms", "fla_cp_fwd_bwd_ms", "fla_efficiency")])
            if rank == 0:
                print(f"T/rank {T}: 1-dev {res['single_fwd_bwd_ms']:.3f} ms, CP={P} {res['cp_fwd_bwd_ms']:.3f} ms, "
                      f"efficiency {res['efficiency']:.3f}", flush=True)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    result = {
        "title": f"Context-parallel {args.op.replace('_', ' ')}, weak scaling, CP={P}",
        "command": "lctrain bench cp " + " ".join(argv),
        "device": f"{P} x " + (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"),
        "versions": {"torch": torch.__version__, "triton": _version("triton"), "fla-core": fla_version},
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "notes": notes,
        "columns": COLUMNS,
        "rows": rows,
        "raw": raw,
    }
    from lctrain.bench.report import publish
    publish(result, args.json, args.record)
    return 0


def _round(x):
    return None if x is None else round(float(x), 3)


def _version(name: str):
    try:
        import importlib.metadata as md
        return md.version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
