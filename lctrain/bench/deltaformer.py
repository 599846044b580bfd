"""`lctrain bench deltaformer`: Deltaformer forward and forward+backward on one GPU, ours against
fla-core's (its whole op, or its u-pass with our read-out where flash-attn is missing) in the same process.

Methods: ``ours`` (backend="triton" with its default ``kernel_dots="auto"``: the Triton chunk passes
and solves of the u-pass forward and backward, SDPA read-out; the kernels' dot operands in the input
dtype for bf16 / fp16, float32 accumulation), ``ours_tf32`` (the same with ``kernel_dots="tf32"``:
float32 dot operands on TF32 tensor cores, what ``ours`` was before 2026-12-01), ``ours_half``
(``kernel_dots="half"``: the same computation as ``ours`` for bf16 / fp16, named explicitly; refused
for fp32), ``ours_torch`` (backend="torch": the chunkwise torch u-pass),
``fla`` (fla-core's ``fla.ops.deltaformer.deltaformer_attn``: its Triton u-pass and a flash-attn
read-out, so it needs the flash-attn package), ``fla_u_sdpa`` (fla's u-pass alone,
``fla.ops.deltaformer.parallel.ParallelDeltaformerFunction``, pure Triton, followed by OUR SDPA
read-out: the like-for-like comparison of the u-pass where flash-attn is missing) and ``sdpa`` (plain
causal attention on the same q, k, v: the read-out alone, the floor). Whatever of fla cannot run is
reported in the notes with the exception's text ("fla unavailable: ..."), never a crash; the ratio
columns divide by ``fla`` when it ran, else by ``fla_u_sdpa`` (the notes say which). Before timing,
the outputs and input gradients of ours and of each fla method are compared with the float32 torch
backend at the first length. Times: ``triton.testing.do_bench`` medians; peak: the extra GPU memory
of one fwd+bwd.
``--json PATH`` writes the result, rewritten after every measurement (marked ``"partial": true`` until the
run ends, so a run cut by a time limit or a kill keeps what it measured); ``--time-limit S`` starts no new
measurement after S seconds (the notes name those not run); ``--record`` appends the result to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys

from lctrain.bench.kernels import _measure, _rel_diff
from lctrain.bench.report import Clock, bench_main, result_dict, time_limit_seconds, write_partial

METHODS = ("ours", "ours_tf32", "ours_half", "ours_torch", "fla", "fla_u_sdpa", "sdpa")
OURS = ("ours", "ours_tf32", "ours_half")                   # the Triton backend, by kernel_dots
DOTS = {"ours": "auto", "ours_tf32": "tf32", "ours_half": "half"}
FLA_METHODS = ("fla", "fla_u_sdpa")
COLUMNS = ["T", "method", "fwd ms", "fwd+bwd ms", "peak MiB", "fwd / fla", "fwd+bwd / fla", "peak / fla"]


def _parse(argv):
    p = argparse.ArgumentParser(prog="lctrain bench deltaformer", description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128, help="head dim of q, k and v")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--chunk-size", type=int, nargs="+", default=[256],
                   help="our u-pass chunk (default 256); several: ours / ours_torch timed at each, as ours/c<N>")
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   help="default: ours ours_tf32 fla fla_u_sdpa sdpa")
    p.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time, ms")
    p.add_argument("--profile", metavar="PATH",
                   help="after the timing, profile one fwd+bwd of each method at the first --T (torch.profiler) "
                        "and write its kernel table and wall vs summed kernel time to PATH")
    p.add_argument("--time-limit", type=time_limit_seconds, default=None, metavar="S",
                   help="start no new measurement (T, method) after S seconds; the notes name those not run")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here (rewritten after every "
                   "measurement, marked partial until the run ends)")
    p.add_argument("--record", nargs="?", const="BENCHMARKS.md", metavar="MD",
                   help="append the result to BENCHMARKS.md (or MD)")
    args = p.parse_args(argv)
    if any(c < 1 for c in args.chunk_size):
        p.error(f"--chunk-size must be positive, got {args.chunk_size}")
    if args.methods is None:
        args.methods = ["ours", "ours_tf32", "fla", "fla_u_sdpa", "sdpa"]
    if "ours_half" in args.methods and args.dtype == "fp32":
        p.error("--methods ours_half rounds the kernels' dots to the input dtype: use --dtype bf16 or fp16")
    return args


def _inputs(B, T, H, D, dtype, device="cuda"):
    import torch
    gen = torch.Generator(device=device).manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x = dict(q=r(B, T, H, D).to(dtype), k=r(B, T, H, D).to(dtype), v=r(B, T, H, D).to(dtype),
             beta=torch.sigmoid(r(B, T, H)).to(dtype))
    for t in x.values():
        t.requires_grad_(True)
    x["do"] = r(B, T, H, D).to(dtype)
    return x


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _fla_u_pass(notes):
    """fla's u-pass, ``fla.ops.deltaformer.parallel.ParallelDeltaformerFunction`` (pure Triton).

    That module imports ``pad_input`` / ``unpad_input`` from ``fla.layers.utils`` at its top, for
    ``deltaformer_attn``'s ``attention_mask`` path only; the fla-core 0.6.0 wheel ships no
    ``fla.layers`` package (only ``fla.ops`` and its helpers), so the import fails with
    ModuleNotFoundError. Then a stand-in ``fla.layers.utils`` whose two functions raise is registered
    (the u-pass calls neither) and the import is retried; a note says so."""
    try:
        from fla.ops.deltaformer.parallel import ParallelDeltaformerFunction
        return ParallelDeltaformerFunction
    except ModuleNotFoundError as e:
        if e.name not in ("fla.layers", "fla.layers.utils"):
            raise
    import types

    def absent(*args, **kwargs):
        raise NotImplementedError("fla.layers is not part of this fla-core wheel (pad_input / unpad_input)")

    utils = types.ModuleType("fla.layers.utils")
    utils.pad_input = utils.unpad_input = absent
    layers = types.ModuleType("fla.layers")
    layers.__path__, layers.utils = [], utils
    sys.modules["fla.layers"], sys.modules["fla.layers.utils"] = layers, utils
    from fla.ops.deltaformer.parallel import ParallelDeltaformerFunction
    notes.append("fla_u_sdpa: this fla-core wheel has no fla.layers, which fla.ops.deltaformer.parallel imports "
                 "at its top (pad_input / unpad_input, for attention_mask only); a stand-in that raises was "
                 "registered so that its u-pass (ParallelDeltaformerFunction, which uses neither) loads")
    return ParallelDeltaformerFunction


def _load_fla(notes, wanted, device="cuda", D: int = 64) -> dict:
    """{method: callable(q, k, v, beta) or None} for the fla methods in ``wanted``; every reason one
    cannot run goes into notes with the exception's text (fla's read-out needs flash-attn)."""
    import importlib.metadata as md

    import torch
    try:
        notes.append(f"fla-core {md.version('fla-core')}")
    except md.PackageNotFoundError:
        notes.append("fla-core is not installed")
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report, do not fail
        notes.append(f"flash-attn not importable ({_why(e)}): fla's deltaformer_attn cannot read out")
    probe = _inputs(1, 512, 1, D, torch.bfloat16, device)   # fla's chunk (512) and D: its autotune key, reused
    out = {}
    for name in wanted:
        try:
            if name == "fla":
                from fla.ops.deltaformer import deltaformer_attn as fn
            else:
                from lctrain.kernels.deltaformer.readout import causal_readout
                ParallelDeltaformerFunction = _fla_u_pass(notes)

                def fn(q, k, v, beta, f=ParallelDeltaformerFunction):
                    return causal_readout(q, k, f.apply(k, k, v, beta), k.shape[-1] ** -0.5)
            fn(probe["q"], probe["k"], probe["v"], probe["beta"])
            out[name] = fn
        except Exception as e:  # noqa: BLE001 - any failure means: not comparable here
            notes.append(f"{name} unavailable: {_why(e)}")
            out[name] = None
    return out


def _fn(name, x, chunk_size, fla):
    """(fwd closure, its differentiable inputs) of a method; "ours/c512" = ours at chunk 512."""
    import torch.nn.functional as F

    from lctrain.kernels import deltaformer
    q, k, v, beta = x["q"], x["k"], x["v"], x["beta"]
    if "/c" in name:
        name, chunk = name.split("/c")
        chunk_size = int(chunk)
    if name in OURS:
        return (lambda: deltaformer(q, k, v, beta, backend="triton", chunk_size=chunk_size,
                                    kernel_dots=DOTS[name])), [q, k, v, beta]
    if name == "ours_torch":
        return (lambda: deltaformer(q, k, v, beta, backend="torch", chunk_size=chunk_size)), [q, k, v, beta]
    if name in FLA_METHODS:
        return (lambda: fla[name](q, k, v, beta)), [q, k, v, beta]
    if name == "sdpa":
        return (lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       is_causal=True).transpose(1, 2)), [q, k, v]
    raise ValueError(name)


def _agreement(x, chunk_size, fla, notes, methods):
    import torch
    xr = {n: t.detach().float().requires_grad_(True) for n, t in x.items()}

    def outs(name, inputs):
        fwd, leaves = _fn(name, inputs, chunk_size, fla)
        o = fwd()
        return [o] + list(torch.autograd.grad(o, leaves, inputs["do"].to(o.dtype)))

    ref = outs("ours_torch", xr)
    names = ["o", "dq", "dk", "dv", "dbeta"]
    T = x["q"].shape[1]
    ours = [m for m in OURS if m in methods]
    for name in ours + [m for m in FLA_METHODS if fla.get(m) is not None]:
        got = outs(name, x)
        notes.append(f"{name} vs the float32 torch backend at T={T}: rel diff "
                     + ", ".join(f"{n} {_rel_diff(a, b):.1e}" for n, a, b in zip(names, got, ref)))


def _expand(methods, chunk_sizes):
    """ours / ours_tf32 / ours_half / ours_torch once per chunk size when several are asked for."""
    if len(chunk_sizes) == 1:
        return methods
    ours = OURS + ("ours_torch",)
    return [f"{m}/c{c}" if m in ours else m for m in methods for c in (chunk_sizes if m in ours else [None])]


def _profile(methods, x, chunk_size, fla, path):
    """One fwd+bwd per method under torch.profiler: wall time, summed GPU kernel time (a wall far
    above it means launch / Python bound) and the kernels by GPU time, written to path."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile
    out = []
    for m in methods:
        fwd, leaves = _fn(m, x, chunk_size, fla)
        torch.autograd.grad(fwd(), leaves, x["do"])          # compile / autotune outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            torch.autograd.grad(fwd(), leaves, x["do"])
            torch.cuda.synchronize()
            wall = 1e3 * (time.perf_counter() - t0)
        events = prof.key_averages()
        dev_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                     for e in events)
        launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
        head = (f"=== {m}  T={x['q'].shape[1]}: one fwd+bwd, wall {wall:.1f} ms under the profiler, GPU kernels "
                f"{dev_us / 1e3:.1f} ms, {launches} kernel launches")
        print(head, flush=True)
        try:
            table = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):
            table = events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
        out += [head, table, ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


def run(args) -> dict:
    import torch
    import triton
    if not torch.cuda.is_available():
        raise SystemExit("lctrain bench deltaformer needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    notes: list[str] = []
    if "ours" in args.methods:
        notes.append("ours: kernel_dots='auto' = " + ("float32 dots" if dtype == torch.float32 else
                     f"{args.dtype} dot operands (kernel_dots='half')") + "; before 2026-12-01 'ours' meant TF32 "
                     "dots (now ours_tf32)")
    methods = list(args.methods)
    fla = _load_fla(notes, [m for m in methods if m in FLA_METHODS], D=args.D)
    methods = _expand([m for m in methods if m not in FLA_METHODS or fla[m] is not None], args.chunk_size)
    chunk = args.chunk_size[0]
    measured: list[tuple[int, dict]] = []  # (T, {method: (fwd ms, fwd+bwd ms, peak MiB) or None}) in --T order
    clock, skipped = Clock(args.time_limit, "bench deltaformer"), []

    def result(final_notes=()):
        return result_dict(
            f"Deltaformer: fwd / fwd+bwd, B={args.B} H={args.H} D={args.D} {args.dtype}, chunk "
            + "/".join(map(str, args.chunk_size)),
            "lctrain bench deltaformer " + " ".join(args.argv),
            torch.cuda.get_device_name(), {"torch": torch.__version__, "triton": triton.__version__},
            notes + list(final_notes) + [
                "sdpa = plain causal attention on q, k, v (the read-out alone); fla_u_sdpa = fla's u-pass "
                "(u kept in the input dtype between chunks, chunk 512) + our SDPA read-out"],
            COLUMNS, *_table(measured))

    for i, T in enumerate(args.T):
        if clock.out_of_time():
            skipped.append(f"T={T} (all)")
            continue
        x = _inputs(args.B, T, args.H, args.D, dtype)
        if i == 0:
            try:
                _agreement(x, chunk, fla, notes, args.methods)
            except torch.cuda.OutOfMemoryError:
                notes.append(f"agreement check at T={T}: out of memory")
        res: dict = {}
        measured.append((T, res))
        for m in methods:
            if clock.out_of_time():
                skipped.append(f"T={T} {m}")
                continue
            fwd, leaves = _fn(m, x, chunk, fla)
            try:
                res[m] = _measure(fwd, leaves, x["do"], args.warmup, args.rep)
            except torch.cuda.OutOfMemoryError:
                res[m] = None
                notes.append(f"{m} at T={T}: out of memory")
            torch.cuda.empty_cache()
            r = res[m]
            print(f"T={T} {m}: " + ("OOM" if r is None else f"fwd {r[0]:.2f} ms, fwd+bwd {r[1]:.2f} ms, "
                                                           f"peak {r[2]:.0f} MiB"), flush=True)
            write_partial(result(), args.json, sum(len(r) for _, r in measured), len(args.T) * len(methods),
                          "measurements (T, method)")
        if i == 0 and args.profile and not clock.out_of_time():
            try:
                _profile([m for m in methods if res.get(m) is not None], x, chunk, fla, args.profile)
                notes.append(f"profile of one fwd+bwd per method at T={T}: {args.profile}")
            except torch.cuda.OutOfMemoryError:
                notes.append(f"profile at T={T}: out of memory")
        elif i == 0 and args.profile:
            skipped.append(f"--profile at T={T}")
        del x
        torch.cuda.empty_cache()
        ref_name = next((m for m in FLA_METHODS if res.get(m) is not None), None)
        if i == 0 and ref_name is not None:
            notes.append(f"ratio columns: method / {ref_name}")
    return result(clock.not_run_note(skipped))


def _table(measured: list) -> tuple[list, list]:
    """(rows, raw) of the measurements so far; the ratio columns divide by fla at the same T when it ran,
    else by fla_u_sdpa (None until one of them is there)."""
    rows, raw = [], []
    for T, res in measured:
        ref = res.get(next((m for m in FLA_METHODS if res.get(m) is not None), ""))
        for m, r in res.items():
            ratio = lambda j, r=r, ref=ref: round(r[j] / ref[j], 3) if (r is not None and ref is not None) else None  # noqa: E731
            rows.append([T, m] + ([None] * 3 if r is None else [round(r[0], 3), round(r[1], 3), round(r[2], 1)])
                        + [ratio(0), ratio(1), ratio(2)])
            raw.append({"T": T, "method": m, "fwd_ms": None if r is None else r[0],
                        "fwd_bwd_ms": None if r is None else r[1], "peak_mib": None if r is None else r[2]})
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    return bench_main(_parse, run, argv)


if __name__ == "__main__":
    sys.exit(main())
