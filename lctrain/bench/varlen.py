"""`lctrain bench varlen`: packed variable-length sequences (cu_seqlens) against one long sequence.

For each op (delta_rule, gated_delta_rule, gated_linear_attn; backend="triton") and each T: forward
and forward+backward (``triton.testing.do_bench``, median ms) of

    one     one sequence of T tokens (B=1, no cu_seqlens)
    packed  the same T tokens as --docs documents of random lengths (B=1, cu_seqlens)
    fla     fla-core's varlen path on the same packed stream (chunk_delta_rule /
            chunk_gated_delta_rule with cu_seqlens), in the same process
    packed@NAME  (--variant NAME:KEY=INT,...) packed under other launch settings (ops.set_config),
            e.g. wider V blocks for the state passes, which have N x more programs with varlen

``--paths`` picks which of one / packed / fla run (``--paths packed fla --ops delta`` is the quick
comparison with fla); every row is printed (flushed) as soon as it is measured, the ``--json`` is rewritten
after every row (marked ``"partial": true`` until the run ends: a run cut by a time limit or a kill keeps
what it measured) and ``--time-limit S`` starts no new row after S seconds (the notes name those not run).

Targets: packed / one <= 1.1 and packed / fla <= 1.0. backend="triton" with cu_seqlens runs the
native varlen kernels (each document cut into its own chunks; the notes say which path ran). fla's gated backward guard
on Hopper with Triton 3.4 - 3.7.0 is lifted as in
``lctrain bench kernels`` and said in the notes. ``--json PATH`` writes the result; ``--record``
appends it to BENCHMARKS.md (lctrain.bench.report).
"""
from __future__ import annotations

import argparse
import sys

from lctrain.bench.kernels import _load_fla, _make_inputs, _measure, _parse_variants, _rel_diff, kernel_versions
from lctrain.bench.report import Clock, bench_main, result_dict, time_limit_seconds, write_partial

OPS = ("delta", "gated_delta", "gla")
PATHS = ("one", "packed", "fla")
COLUMNS = ["T", "docs", "op", "path", "fwd ms", "fwd+bwd ms", "fwd+bwd / one", "fwd+bwd / fla"]


def _parse(argv):
    p = argparse.ArgumentParser(prog="lctrain bench varlen", description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[131072], help="packed lengths (default 128K)")
    p.add_argument("--docs", type=int, default=64, help="documents per packed stream (default 64)")
    p.add_argument("--H", type=int, default=16, help="heads (default 16)")
    p.add_argument("--D", type=int, default=128, help="head dim, for q/k and v (default 128)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--ops", "--methods", dest="ops", nargs="+", choices=OPS, default=list(OPS),
                   help="which mixers (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document lengths (default 0)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                   help="which paths to time (default all: one sequence, packed, fla packed)")
    p.add_argument("--no-fla", action="store_true", help="skip fla-core (same as leaving fla out of --paths)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=INT[,KEY=INT]",
                   help="also time packed under these launch settings (lctrain.kernels.triton.ops.set_config), "
                        "rows packed@NAME; repeatable")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (default 100)")
    p.add_argument("--time-limit", type=time_limit_seconds, default=None, metavar="S",
                   help="start no new measurement (T, op, path) after S seconds; the notes name those not run")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here (rewritten after every "
                   "measurement, marked partial until the run ends)")
    p.add_argument("--record", nargs="?", const="BENCHMARKS.md", metavar="MD",
                   help="append the result to BENCHMARKS.md (or MD)")
    args = p.parse_args(argv)
    if args.docs < 1 or any(T < args.docs for T in args.T):
        p.error(f"--docs must be >= 1 and at most every --T (got docs={args.docs}, T={args.T})")
    if args.no_fla and "fla" in args.paths:
        args.paths = [x for x in args.paths if x != "fla"]
    if args.variant and "packed" not in args.paths:
        p.error("--variant times the packed path with other launch settings: keep packed in --paths")
    args.variants = _parse_variants(args.variant)[1:]  # SystemExit naming a malformed --variant
    return args


def document_bounds(T: int, n_docs: int, seed: int) -> list[int]:
    """[0, ..., T]: n_docs documents of random lengths >= 1 (seeded cut points)."""
    import random

    cuts = sorted(random.Random(seed).sample(range(1, T), n_docs - 1))
    return [0] + cuts + [T]


def _ours(op: str, x: dict, cu):
    from lctrain.kernels import delta_rule, gated_delta_rule, gated_linear_attn
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
    kw = dict(backend="triton", cu_seqlens=cu)
    if op == "delta":
        return (lambda: delta_rule(q, k, v, beta, **kw)[0]), [q, k, v, beta]
    if op == "gated_delta":
        return (lambda: gated_delta_rule(q, k, v, g, beta, **kw)[0]), [q, k, v, g, beta]
    return (lambda: gated_linear_attn(q, k, v, g, **kw)[0]), [q, k, v, g]


def _fla(op: str, x: dict, cu, fla):
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
    if op == "delta":
        return (lambda: fla[0](q, k, v, beta, cu_seqlens=cu)[0]), [q, k, v, beta]
    return (lambda: fla[1](q, k, v, g, beta, cu_seqlens=cu)[0]), [q, k, v, g, beta]


def _packed_path() -> str:
    """Which code runs backend="triton" with cu_seqlens: native varlen kernels or the per-document loop."""
    from lctrain.kernels import api
    fn = api._triton_fn("gated_delta_rule")[0]
    return "native varlen kernels" if fn is not None and api._takes_cu_seqlens(fn) else \
        "per-document loop over the ordinary Triton kernels (native varlen kernels pending)"


def run(args) -> dict:
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("lctrain bench varlen needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    notes = [f"backend='triton' with cu_seqlens ran: {_packed_path()}"]
    fla, fla_version = None, None
    if "fla" in args.paths:
        try:
            *fla, fla_version = _load_fla(notes)
        except ImportError as e:
            notes.append(f"fla-core not importable ({e}); fla rows skipped")
    from lctrain.kernels.triton import ops as triton_ops
    for _, kv in args.variants:  # validate before any timing
        triton_ops.set_config(**triton_ops.set_config(**kv))
    if args.variants:
        notes.append("variants (packed@NAME rows): " + "; ".join(f"{n} = {kv}" for n, kv in args.variants))
    measured: list[tuple[int, str, dict]] = []  # (T, op, {path: (fwd ms, fwd+bwd ms, peak) or None})
    clock, skipped = Clock(args.time_limit, "bench varlen"), []
    n_paths = sum(p != "fla" for p in args.paths) + len(args.variants) * ("packed" in args.paths)
    total = len(args.T) * sum(n_paths + ("fla" in args.paths and fla is not None and op != "gla") for op in args.ops)

    def result(final_notes=()):
        return result_dict(
            f"Varlen kernels: {args.docs} packed documents vs one sequence, H={args.H} D={args.D} {args.dtype}",
            "lctrain bench varlen " + " ".join(args.argv),
            torch.cuda.get_device_name(), kernel_versions(fla_version),
            notes + list(final_notes) + ["times: triton.testing.do_bench median; targets: packed fwd+bwd / one "
                                         "<= 1.1, packed / fla packed <= 1.0"],
            COLUMNS, *_table(measured, args.docs))

    for T in args.T:
        if clock.out_of_time():
            skipped.append(f"T={T} (all)")
            continue
        bounds = document_bounds(T, args.docs, args.seed)
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        notes.append(f"T={T}: {args.docs} documents, lengths {min(lengths)} .. {max(lengths)} (seed {args.seed})")
        x = _make_inputs(1, T, args.H, args.D, dtype, "cuda")
        cu = torch.tensor(bounds, dtype=torch.int32, device=x["q"].device)
        cu_fla = cu.long()
        for op in args.ops:
            if clock.out_of_time():
                skipped.append(f"T={T} {op}")
                continue
            runs = []  # (path, (fwd, inputs), launch settings); references first, so packed rows print ratios
            if fla is not None and op != "gla":
                runs.append(("fla packed", _fla(op, x, cu_fla, fla), {}))
                if "packed" in args.paths:  # fla's first call autotunes: here, outside the timing
                    with torch.no_grad():
                        diff = _rel_diff(_ours(op, x, cu)[0](), runs[-1][1][0]())
                    notes.append(f"T={T} {op}: packed output vs fla packed, rel diff {diff:.1e}")
                    print(notes[-1], flush=True)
            if "one" in args.paths:
                runs.append(("one", _ours(op, x, None), {}))
            if "packed" in args.paths:
                runs.append(("packed", _ours(op, x, cu), {}))
                runs += [(f"packed@{name}", _ours(op, x, cu), kv) for name, kv in args.variants]
            res: dict = {}
            measured.append((T, op, res))
            for path, (fwd, inputs), kv in runs:
                if clock.out_of_time():
                    skipped.append(f"T={T} {op} {path}")
                    continue
                previous = triton_ops.set_config(**kv) if kv else None
                try:
                    res[path] = _measure(fwd, inputs, x["do"], args.warmup, args.rep)
                except torch.cuda.OutOfMemoryError:
                    res[path] = None
                    notes.append(f"{op} {path} at T={T}: out of memory")
                finally:
                    if previous is not None:
                        triton_ops.set_config(**previous)
                torch.cuda.empty_cache()
                r = res[path]
                vs = [f"{r[1] / res[ref][1]:.3f}x {ref}" for ref in ("one", "fla packed")
                      if r is not None and path.startswith("packed") and res.get(ref) is not None]
                print(f"T={T} {op} {path}: " + ("OOM" if r is None else f"fwd {r[0]:.3f} ms, fwd+bwd {r[1]:.3f} ms")
                      + (f" (fwd+bwd {', '.join(vs)})" if vs else ""), flush=True)
                write_partial(result(), args.json, sum(len(r) for *_, r in measured), total,
                              "measurements (T, op, path)")
        del x
        torch.cuda.empty_cache()
    return result(clock.not_run_note(skipped))


def _table(measured: list, docs: int) -> tuple[list, list]:
    """(rows, raw) of the measurements so far; a packed row's ratios need the reference's measurement at
    the same T and op (None until it is there)."""
    rows, raw = [], []
    for T, op, res in measured:
        for path, r in res.items():
            def ratio(ref, r=r, path=path):  # fwd+bwd of a packed row over the reference's
                packed = path.startswith("packed")
                return None if r is None or ref is None or not packed else round(r[1] / ref[1], 3)
            rows.append([T, docs if path != "one" else 1, op, path,
                         None if r is None else round(r[0], 3), None if r is None else round(r[1], 3),
                         ratio(res.get("one")), ratio(res.get("fla packed"))])
            raw.append({"T": T, "op": op, "path": path, "fwd_ms": None if r is None else r[0],
                        "fwd_bwd_ms": None if r is None else r[1]})
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    return bench_main(_parse, run, argv)


if __name__ == "__main__":
    sys.exit(main())
