"""`lctrain bench deltaformer-cp`: what context parallelism costs Deltaformer (strong scaling).

One sequence of T tokens: ``deltaformer`` on one device against ``deltaformer_cp`` over N ranks, each
holding T / N tokens, for each ``--schedule`` (lctrain/parallel/deltaformer_cp.py): ``pipeline``
(ranks stream their u piece by piece to the later ranks, the backward streams the finished rows back)
and ``gather`` (every rank gathers k, v, beta and solves the u-pass over its whole prefix, so the last
rank repeats the full u-pass). Times are medians of the slowest rank per iteration for CP and the
ranks' mean for the one-device run;

    speed-up = time(1 device, T) / time(CP = N, T)

After the timing, one more fwd+bwd of the pipeline runs with a device synchronisation at every
phase edge and prints each rank's wall time per phase (waiting for earlier u / later rows, folding
them in, the local chunk passes, the read-out): where the pipeline's time goes.
``--device cpu`` runs the same code on gloo at tiny sizes.
Each row is printed when measured; ``--json PATH`` writes the result (rank 0), rewritten after every row
(marked ``"partial": true`` until the run ends, so a run cut by a time limit or a kill keeps what it
measured); ``--time-limit S`` starts no new case (T, schedule) after S seconds, agreed between the ranks so
that all stop at the same case (the notes name those not run); ``--record`` appends the result to
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys

from lctrain.bench.cp import _cp_device, _peak_mib, _timed, _version, init_worker, run_or_launch

COLUMNS = ["T total", "T/rank", "schedule", "1-dev fwd ms", "1-dev fwd+bwd ms", "CP fwd ms", "CP fwd+bwd ms",
           "speed-up", "1-dev peak MiB", "CP peak MiB"]
SCHEDULES = ("pipeline", "gather")


def _parse(argv):
    from lctrain.bench.report import time_limit_seconds

    p = argparse.ArgumentParser(prog="lctrain bench deltaformer-cp", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="CP ranks (default: all GPUs; 2 on CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--T", type=int, nargs="+", default=None, help="total tokens (GPU default 16K 32K 64K; CPU 64)")
    p.add_argument("--H", type=int, default=None, help="heads (GPU default 16)")
    p.add_argument("--D", type=int, default=None, help="head dim (GPU default 128)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--schedule", nargs="+", choices=SCHEDULES, default=list(SCHEDULES),
                   help="CP schedules to time (default both)")
    p.add_argument("--piece-size", type=int, default=None,
                   help="pipeline: tokens per streamed piece (default 4 chunks)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--time-limit", type=time_limit_seconds, default=None, metavar="S",
                   help="start no new case (T, schedule) after S seconds; every rank stops at the same one and the "
                        "notes name those not run")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here (rank 0; rewritten after every "
                   "row, marked partial until the run ends)")
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


def _breakdown(fn, group, rank, P) -> dict:
    """Per-rank wall ms per pipeline phase of one call of fn (PHASES on), gathered to every rank."""
    import torch.distributed as dist

    from lctrain.parallel.deltaformer_cp import PHASE_ORDER, PHASES
    PHASES.ms, PHASES.enabled = {}, True
    try:
        fn()
    finally:
        PHASES.enabled = False
    per_rank = [None] * P
    dist.all_gather_object(per_rank, PHASES.ms, group=group)
    seen = set().union(*per_rank)
    return {name: [round(d.get(name, 0.0), 2) for d in per_rank] for name in PHASE_ORDER if name in seen}


def _worker(args, argv) -> int:
    import torch
    import torch.distributed as dist

    from lctrain.bench.report import Clock, publish, result_dict, write_partial
    from lctrain.kernels import deltaformer
    from lctrain.kernels.deltaformer.api import resolve
    from lctrain.parallel.deltaformer_cp import deltaformer_cp

    device, group, P, rank = init_worker(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    kw = dict(backend=args.backend, chunk_size=args.chunk_size)
    rows, raw, notes = [], [], []
    # The CP pipeline's kernels take float32 (TF32) dot operands; the single-device reference takes
    # the same ones (kernel_dots="tf32"), not the half dots its default would pick for bf16 / fp16.
    single_dots = {}
    if resolve(args.backend, device) == "triton" and dtype != torch.float32:
        single_dots = {"kernel_dots": "tf32"}
        notes.append("1 device: kernel_dots='tf32', the dots of the CP pipeline (its default for half inputs, "
                     "half-precision dots, is faster)")
    clock, skipped = Clock(args.time_limit, "bench deltaformer-cp", rank=rank, group=group, device=device), []

    def result(final_notes=()):
        return result_dict(
            f"Context-parallel Deltaformer, strong scaling, CP={P}",
            "lctrain bench deltaformer-cp " + " ".join(argv), _cp_device(P, device),
            {"torch": torch.__version__, "triton": _version("triton")},
            [f"H={args.H}, head dim {args.D}, {args.dtype}, backend {args.backend}, chunk {args.chunk_size}, "
             f"piece {args.piece_size or 4 * args.chunk_size}, {args.warmup} warm-up + {args.iters} timed "
             "iterations; pipeline = u streamed piece by piece to later ranks; gather = all-gather of k, v, beta "
             "and the u-pass of each rank's whole prefix (the last rank repeats the full u-pass); per-phase "
             "pipeline times in raw"] + notes + list(final_notes), COLUMNS, rows, raw)

    try:
        for T in args.T:
            if T % P:
                raise SystemExit(f"--T {T} does not split over {P} ranks")
            if clock.out_of_time():  # the same answer on every rank: they all stop here
                skipped.append(f"T={T} (all)")
                continue
            clock.progress(f"T {T} (T/rank {T // P})")
            gen = torch.Generator(device=device).manual_seed(T)
            full = {n: torch.randn(1, T, args.H, args.D, generator=gen, device=device).to(dtype)
                    for n in ("q", "k", "v", "do")}
            full["beta"] = torch.sigmoid(torch.randn(1, T, args.H, generator=gen, device=device)).to(dtype)
            Tl = T // P
            local = {n: t[:, rank * Tl:(rank + 1) * Tl].contiguous() for n, t in full.items()}
            runs = [("single", full, lambda x: deltaformer(x["q"], x["k"], x["v"], x["beta"], **kw, **single_dots),
                     False)]
            for sched in args.schedule:
                piece = args.piece_size if sched == "pipeline" else None
                runs.append((sched, local, lambda x, sched=sched, piece=piece: deltaformer_cp(
                    x["q"], x["k"], x["v"], x["beta"], group, schedule=sched, piece_size=piece, **kw), True))
            res = {}
            for name, x, op, slowest in runs:
                if name != "single" and clock.out_of_time():
                    skipped.append(f"T={T} {name}")
                    continue
                leaves = {n: x[n].detach().requires_grad_(True) for n in ("q", "k", "v", "beta")}

                def f_only(leaves=leaves, op=op):
                    with torch.no_grad():
                        op(leaves)

                def f_bwd(leaves=leaves, op=op, do=x["do"]):
                    torch.autograd.grad(op(leaves), list(leaves.values()), do)

                try:
                    res[name] = (_timed(f_only, device, group, args.warmup, args.iters, slowest),
                                 _timed(f_bwd, device, group, args.warmup, args.iters, slowest),
                                 _peak_mib(f_bwd, device, group))
                except torch.cuda.OutOfMemoryError:  # every rank runs the same sizes; OOM is reported, not fatal
                    res[name] = None
                    notes.append(f"{name} at T={T}: out of memory")
                if name == "pipeline" and res[name] is not None:
                    phases = _breakdown(f_bwd, group, rank, P)
                    raw.append({"T_total": T, "T_per_rank": Tl, "pipeline_phase_ms_per_rank": phases})
                    if rank == 0:
                        print(f"T {T}, pipeline fwd+bwd, wall ms per phase on ranks 0..{P - 1} "
                              "(device synchronised at each phase edge):", flush=True)
                        for ph, ms in phases.items():
                            print(f"  {ph:34s} " + " ".join(f"{m:9.1f}" for m in ms), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if name != "single":
                    _add_row(rows, raw, T, Tl, name, res["single"], res[name])
                    if rank == 0:
                        print(f"T {T}: 1-dev fwd+bwd {_ms(res['single'], 1)}, CP={P} {name} {_ms(res[name], 1)}",
                              flush=True)
                        write_partial(result(), args.json, len(rows), len(args.T) * len(args.schedule),
                                      "cases (T, schedule)")
        clock.progress("done")
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    publish(result(clock.not_run_note(skipped)), args.json, args.record)
    return 0


def _add_row(rows, raw, T, Tl, sched, single, r) -> None:
    """The row (and raw entry) of one schedule at T: its times against the one-device run's."""
    speed = None if (r is None or single is None) else single[1] / r[1]
    raw.append({"T_total": T, "T_per_rank": Tl, "schedule": sched,
                **{f"single_{k}": None if single is None else v
                   for k, v in zip(("fwd_ms", "fwd_bwd_ms", "peak_mib"), single or (None,) * 3)},
                **{f"cp_{k}": None if r is None else v
                   for k, v in zip(("fwd_ms", "fwd_bwd_ms", "peak_mib"), r or (None,) * 3)},
                "speed_up": speed})
    rows.append([T, Tl, sched] + [None if v is None else round(float(v), 3) for v in (
        *(single or (None,) * 3)[:2], *(r or (None,) * 3)[:2], speed, (single or (None,) * 3)[2],
        (r or (None,) * 3)[2])])


def _ms(r, i):
    return "OOM" if r is None else f"{r[i]:.1f} ms"


if __name__ == "__main__":
    sys.exit(main())
