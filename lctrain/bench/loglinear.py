"""`lctrain bench loglinear`: time the log-linear ops against their base ops and fla-core, one process.

For each sequence length, forward and forward+backward (``triton.testing.do_bench``, median ms) and the
peak extra GPU memory of one forward+backward, for

    ll_gdn      loglinear_gated_delta_rule (ours, backend "triton": the fused level kernels)
    gdn         gated_delta_rule (ours, Triton)                        -> column "/ base" of ll_gdn
    ll_mamba2   loglinear_gated_linear_attn (ours, backend "triton")
    mamba2      gated_linear_attn (ours, Triton)                       -> column "/ base" of ll_mamba2
    fla_ll_mamba2  fla-core's chunk_log_linear_attn (fla.ops.log_linear_attn), imported lazily here only
    ll_gdn_composed, ll_mamba2_composed  the same ops on backend "triton_composed" (one base-op run per
                level, the reference the fused kernels replace; not in the default --methods)
    ll_gdn_shard  ll_gdn as the second of two CP ranks runs its shard: the T tokens at position T, with an
                incoming level state and the level weights of 2T tokens, final states returned (not in the
                default --methods): against ll_gdn, what a CP=2 rank adds beyond the one-GPU call

``--levels-cfg "LP=4,BV=16" "LP=1,BV=64,warps=4"`` also times ll_gdn / ll_mamba2 / ll_gdn_shard (those asked for) under
each launch setting of the level kernels (rows ``ll_gdn@LP=4,BV=16``; keys: kernels/loglinear/
triton_levels.CONFIG), to pick their defaults on a new GPU.

fla's log-linear Mamba-2 shares q and k over the heads (one group); ll_mamba2 and fla_ll_mamba2 get the
same shared q/k (expanded to every head for ours), g, v and level weights; the level weights are in the
inputs' dtype for every method (fla's forward kernel multiplies its scores by them before a ``tl.dot``
with v, and fp32 weights beside bf16 v do not compile: the CompilationError of fla-core 0.6.0 in the
2026-12-01 runs); column "fla / ours" is
fla's time over ours (target >= 5 at >= 64K). fla has no scale: ours runs with scale=1 there, and the
first length also reports the relative difference of the two outputs (same definition: it should be
small). Lengths where a method runs out of memory or is refused (fla: below 2^17) are reported as such.
``--json PATH`` writes the result, rewritten after every measurement (marked ``"partial": true`` until the
run ends, so a run cut by a time limit or a kill keeps what it measured); ``--time-limit S`` starts no new
measurement after S seconds (the notes name those not run); ``--record`` also appends the result to
BENCHMARKS.md (lctrain.bench.report).
"""
from __future__ import annotations

import argparse
import sys

from lctrain.bench.kernels import _measure, kernel_versions
from lctrain.bench.report import Clock, bench_main, error_note, result_dict, time_limit_seconds, write_partial

METHODS = ("ll_gdn", "gdn", "ll_mamba2", "mamba2", "fla_ll_mamba2")
EXTRA_METHODS = ("ll_gdn_composed", "ll_mamba2_composed", "ll_gdn_shard")
BASE_OF = {"ll_gdn": "gdn", "ll_mamba2": "mamba2", "ll_gdn_composed": "gdn", "ll_mamba2_composed": "mamba2",
           "ll_gdn_shard": "gdn"}
COLUMNS = ["T", "method", "fwd ms", "fwd+bwd ms", "peak MiB", "fwd+bwd / base", "fla / ours (fwd+bwd)"]


def _parse(argv):
    p = argparse.ArgumentParser(prog="lctrain bench loglinear", description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[16384, 32768, 65536, 131072],
                   help="sequence lengths (default 16K 32K 64K 128K; the 1-GPU reach: --T 524288 1048576 --methods "
                        "ll_gdn)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128, help="head dim of q/k and v (default 128)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--methods", nargs="+", choices=METHODS + EXTRA_METHODS, default=list(METHODS))
    p.add_argument("--levels-cfg", nargs="+", default=[], metavar="KEY=INT[,KEY=INT]",
                   help="also time ll_gdn / ll_mamba2 / ll_gdn_shard under these launch settings of the level kernels")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--time-limit", type=time_limit_seconds, default=None, metavar="S",
                   help="start no new measurement (T, method) after S seconds; the notes name those not run")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here (rewritten after every "
                   "measurement, marked partial until the run ends)")
    p.add_argument("--record", nargs="?", const="BENCHMARKS.md", metavar="MD",
                   help="append the result to BENCHMARKS.md (or MD)")
    return p.parse_args(argv)


def _inputs(B, T, H, D, dtype, device, shard: bool = False):
    import torch
    import torch.nn.functional as F

    from lctrain.kernels import levels_needed
    gen = torch.Generator(device=device).manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x = dict(q=r(B, T, H, D).to(dtype), k=F.normalize(r(B, T, H, D), dim=-1).to(dtype), v=r(B, T, H, D).to(dtype),
             g=F.logsigmoid(r(B, T, H) + 3.0), beta=torch.sigmoid(r(B, T, H)).to(dtype),
             lam=F.softplus(r(B, T, H, levels_needed(T))).to(dtype),
             q1=(r(B, T, 1, D) * D ** -0.5).to(dtype), k1=(r(B, T, 1, D) * D ** -0.5).to(dtype))  # shared q/k
    for t in x.values():
        t.requires_grad_(True)
    x["do"] = r(B, T, H, D).to(dtype)
    if shard:  # ll_gdn_shard's own inputs, drawn last (the others stay as they were) and only when it runs
        x["lam2"] = F.softplus(r(B, T, H, levels_needed(2 * T))).to(dtype).requires_grad_(True)   # weights of 2T
        x["init"] = r(B, H, levels_needed(2 * T), D, D) * 0.1   # its incoming level states (no grad)
    return x


def _method(name, x, fla):
    """(forward returning o, differentiable inputs)."""
    from lctrain.kernels import (
        gated_delta_rule,
        gated_linear_attn,
        loglinear_gated_delta_rule,
        loglinear_gated_linear_attn,
    )
    name = name.split("@")[0]  # "ll_gdn@LP=4": the launch settings are applied by the caller
    q, k, v, g, beta, lam = x["q"], x["k"], x["v"], x["g"], x["beta"], x["lam"]
    H = v.shape[2]
    shared = lambda t: t.expand(-1, -1, H, -1)  # noqa: E731 - ours takes one q/k per head
    if name in ("ll_gdn", "ll_gdn_composed"):
        backend = "triton" if name == "ll_gdn" else "triton_composed"
        return (lambda: loglinear_gated_delta_rule(q, k, v, g, beta, lam, backend=backend)[0]), [q, k, v, g, beta, lam]
    if name == "ll_gdn_shard":
        T = q.shape[1]
        return (lambda: loglinear_gated_delta_rule(q, k, v, g, beta, x["lam2"], initial_state=x["init"],
                                                   output_final_state=True, position_offset=T, backend="triton")[0],
                [q, k, v, g, beta, x["lam2"]])
    if name == "gdn":
        return (lambda: gated_delta_rule(q, k, v, g, beta, backend="triton")[0]), [q, k, v, g, beta]
    if name in ("ll_mamba2", "ll_mamba2_composed"):
        backend = "triton" if name == "ll_mamba2" else "triton_composed"
        return (lambda: loglinear_gated_linear_attn(shared(x["q1"]), shared(x["k1"]), v, g, lam, scale=1.0,
                                                    backend=backend)[0],
                [x["q1"], x["k1"], v, g, lam])
    if name == "mamba2":
        return (lambda: gated_linear_attn(shared(x["q1"]), shared(x["k1"]), v, g, scale=1.0, backend="triton")[0],
                [x["q1"], x["k1"], v, g])
    if name == "fla_ll_mamba2":
        return (lambda: fla(x["q1"], x["k1"], v, g, lam)[0]), [x["q1"], x["k1"], v, g, lam]
    raise ValueError(name)


def _load_fla(notes):
    try:
        import importlib.metadata as md

        from fla.ops.log_linear_attn import chunk_log_linear_attn
    except Exception as err:  # noqa: BLE001 - any import failure means "no fla here"
        notes.append(f"fla-core not importable ({type(err).__name__}: {err}); fla rows skipped")
        return None
    try:
        version = md.version("fla-core")
    except Exception:  # noqa: BLE001
        version = "unknown"
    notes.append(f"fla-core {version}: fla.ops.log_linear_attn.chunk_log_linear_attn")
    return chunk_log_linear_attn, version


def run(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("lctrain bench loglinear needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    notes = [f"B={args.B}, H={args.H}, head dim {args.D}, {args.dtype}; level weights L = bit_length(T-1)+1"]
    methods = list(args.methods)
    fla, fla_version = None, None
    if "fla_ll_mamba2" in methods:
        loaded = _load_fla(notes)
        if loaded is None:
            methods.remove("fla_ll_mamba2")
        else:
            fla, fla_version = loaded
    from lctrain.kernels.loglinear import triton_levels
    for spec in args.levels_cfg:
        # refuse a malformed one (format, keys, values) before any timing
        triton_levels.set_levels_config(**triton_levels.set_levels_config(**triton_levels.parse_levels_config(spec)))
        methods += [f"{m}@{spec}" for m in ("ll_gdn", "ll_mamba2", "ll_gdn_shard") if m in args.methods]
    measured: list[tuple[int, dict]] = []  # (T, {method: (fwd ms, fwd+bwd ms, peak MiB) or None}) in --T order
    clock, skipped = Clock(args.time_limit, "bench loglinear"), []

    def result(final_notes=()):
        return result_dict(
            f"Log-linear kernels: fwd / fwd+bwd, B={args.B} H={args.H} D={args.D} {args.dtype}",
            "lctrain bench loglinear " + " ".join(args.argv),
            torch.cuda.get_device_name(), kernel_versions(fla_version),
            notes + list(final_notes) + [
                "times: triton.testing.do_bench median; peak MiB: extra GPU memory of one fwd+bwd; "
                "'/ base': ll_gdn over gdn, ll_mamba2 over mamba2 (target for ll_gdn <= 3); "
                "'fla / ours': fla_ll_mamba2 over ll_mamba2 (target >= 5 at >= 64K)"],
            COLUMNS, *_table(measured))

    for i, T in enumerate(args.T):
        if clock.out_of_time():
            skipped.append(f"T={T} (all)")
            continue
        x = _inputs(args.B, T, args.H, args.D, dtype, "cuda", shard="ll_gdn_shard" in args.methods)
        if i == 0 and fla is not None and "ll_mamba2" in methods:
            try:
                with torch.no_grad():
                    a, b = _method("ll_mamba2", x, fla)[0](), _method("fla_ll_mamba2", x, fla)[0]()
                diff = float((a.float() - b.float()).norm() / b.float().norm())
                notes.append(f"ll_mamba2 vs fla_ll_mamba2 at T={T}: relative difference of outputs {diff:.2e}")
            except Exception as err:  # noqa: BLE001
                notes.append(f"agreement check with fla at T={T} failed: {error_note(err)}")
        res: dict = {}
        measured.append((T, res))
        for m in methods:
            if clock.out_of_time():
                skipped.append(f"T={T} {m}")
                continue
            fwd, inputs = _method(m, x, fla)
            cfg = triton_levels.parse_levels_config(m.split("@")[1]) if "@" in m else {}
            old = triton_levels.set_levels_config(**cfg) if cfg else None
            try:
                res[m] = _measure(fwd, inputs, x["do"], args.warmup, args.rep)
            except torch.cuda.OutOfMemoryError:
                res[m] = None
                notes.append(f"{m} at T={T}: out of memory")
            except Exception as err:  # noqa: BLE001 - e.g. fla's length cap; report and go on
                res[m] = None
                notes.append(f"{m} at T={T}: {error_note(err)}")
            finally:
                if old is not None:
                    triton_levels.set_levels_config(**old)
            del fwd, inputs
            torch.cuda.empty_cache()
            r = res[m]
            print(f"T={T} {m}: " + ("failed" if r is None else f"fwd {r[0]:.3f} ms, fwd+bwd {r[1]:.3f} ms, "
                                    f"peak {r[2]:.0f} MiB"), flush=True)
            write_partial(result(), args.json, sum(len(r) for _, r in measured), len(args.T) * len(methods),
                          "measurements (T, method)")
        del x
        torch.cuda.empty_cache()
    return result(clock.not_run_note(skipped))


def _table(measured: list) -> tuple[list, list]:
    """(rows, raw) of the measurements so far; a ratio needs its base's (or fla's) measurement at the same
    T (None until it is there)."""
    rows, raw = [], []
    for T, res in measured:
        for m, r in res.items():
            base = res.get(BASE_OF.get(m.split("@")[0], ""))
            fla_r = res.get("fla_ll_mamba2") if m.split("@")[0] == "ll_mamba2" else None
            rows.append([T, m] + ([None] * 3 if r is None else [round(r[0], 3), round(r[1], 3), round(r[2], 1)])
                        + [None if r is None or base is None else round(r[1] / base[1], 3),
                           None if r is None or fla_r is None else round(fla_r[1] / r[1], 3)])
            raw.append({"T": T, "method": m, "fwd_ms": None if r is None else r[0],
                        "fwd_bwd_ms": None if r is None else r[1], "peak_mib": None if r is None else r[2]})
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    return bench_main(_parse, run, argv)


if __name__ == "__main__":
    sys.exit(main())
