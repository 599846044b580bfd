"""`lctrain bench deltaformer-cp`: what context parallelism costs Deltaformer (strong scaling).

One sequence of T tokens: ``deltaformer`` on one device against ``deltaformer_cp`` over N ranks, each
holding T / N tokens (lctrain/parallel/deltaformer_cp.py: every rank gathers k, v, beta and solves
the u-pass over its whole prefix, so the last rank repeats the full u-pass). Times are medians of the
slowest rank per iteration for CP and the ranks' mean for the one-device run;

    speed-up = time(1 device, T) / time(CP = N, T)

which the u-pass caps near 1 by construction: the figure shows how much the read-out, spread over
the ranks, gains back. ``--device cpu`` runs the same code on gloo at tiny sizes.
``--json PATH`` writes the result, ``--record`` appends it to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys

from lctrain.bench.cp import _cp_device, _peak_mib, _timed, _version, init_worker, run_or_launch

COLUMNS = ["T total", "T/rank", "1-dev fwd ms", "1-dev fwd+bwd ms", "CP fwd ms", "CP fwd+bwd ms", "speed-up",
           "1-dev peak MiB", "CP peak MiB"]


def _parse(argv):
    p = argparse.ArgumentParser(prog="lctrain bench deltaformer-cp", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="CP ranks (default: all GPUs; 2 on CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--T", type=int, nargs="+", default=None, help="total tokens (GPU default 16K 32K 64K; CPU 64)")
    p.add_argument("--H", type=int, default=None, help="heads (GPU default 16)")
    p.add_argument("--D", type=int, default=None, help="head dim (GPU default 128)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--record", nargs="?", const="BENCHMARKS.md", metavar="MD")
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    defaults = dict(T=[16384, 32768, 65536] if gpu else [64], H=16 if gpu else 2, D=128 if gpu else 16,
                    dtype="bf16" if gpu else "fp32", chunk_size=256 if gpu else 16, warmup=2 if gpu else 1,
                    iters=5 if gpu else 2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    return run_or_launch(args, argv, "lctrain.bench.deltaformer_cp", _worker)


def _worker(args, argv) -> int:
    import torch
    import torch.distributed as dist

    from lctrain.kernels import deltaformer
    from lctrain.parallel.deltaformer_cp import deltaformer_cp

    device, group, P, rank = init_worker(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    kw = dict(backend=args.backend, chunk_size=args.chunk_size)
    rows, raw = [], []
    try:
        for T in args.T:
            if T % P:
                raise SystemExit(f"--T {T} does not split over {P} ranks")
            gen = torch.Generator(device=device).manual_seed(T)
            full = {n: torch.randn(1, T, args.H, args.D, generator=gen, device=device).to(dtype)
                    for n in ("q", "k", "v", "do")}
            full["beta"] = torch.sigmoid(torch.randn(1, T, args.H, generator=gen, device=device)).to(dtype)
            Tl = T // P
            local = {n: t[:, rank * Tl:(rank + 1) * Tl].contiguous() for n, t in full.items()}
            res = {"T_total": T, "T_per_rank": Tl}
            for name, x, op, slowest in (
                    ("single", full, lambda x: deltaformer(x["q"], x["k"], x["v"], x["beta"], **kw), False),
                    ("cp", local, lambda x: deltaformer_cp(x["q"], x["k"], x["v"], x["beta"], group, **kw), True)):
                leaves = {n: x[n].detach().requires_grad_(True) for n in ("q", "k", "v", "beta")}

                def f_only(leaves=leaves, op=op):
                    with torch.no_grad():
                        op(leaves)

                def f_bwd(leaves=leaves, op=op, do=x["do"]):
                    torch.autograd.grad(op(leaves), list(leaves.values()), do)

                res[f"{name}_fwd_ms"] = _timed(f_only, device, group, args.warmup, args.iters, slowest)
                res[f"{name}_fwd_bwd_ms"] = _timed(f_bwd, device, group, args.warmup, args.iters, slowest)
                res[f"{name}_peak_mib"] = _peak_mib(f_bwd, device, group)
            res["speed_up"] = res["single_fwd_bwd_ms"] / res["cp_fwd_bwd_ms"]
            raw.append(res)
            rows.append([T, Tl] + [None if res[k] is None else round(float(res[k]), 3) for k in (
                "single_fwd_ms", "single_fwd_bwd_ms", "cp_fwd_ms", "cp_fwd_bwd_ms", "speed_up", "single_peak_mib",
                "cp_peak_mib")])
            if rank == 0:
                print(f"T {T}: 1-dev {res['single_fwd_bwd_ms']:.1f} ms, CP={P} {res['cp_fwd_bwd_ms']:.1f} ms",
                      flush=True)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    from lctrain.bench.report import publish, result_dict
    result = result_dict(
        f"Context-parallel Deltaformer, strong scaling, CP={P}",
        "lctrain bench deltaformer-cp " + " ".join(argv), _cp_device(P, device),
        {"torch": torch.__version__, "triton": _version("triton")},
        [f"H={args.H}, head dim {args.D}, {args.dtype}, backend {args.backend}, chunk {args.chunk_size}, "
         f"{args.warmup} warm-up + {args.iters} timed iterations; CP = all-gather of k, v, beta and the "
         "u-pass of each rank's whole prefix (the last rank repeats the full u-pass)"],
        COLUMNS, rows, raw)
    publish(result, args.json, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
