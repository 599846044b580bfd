"""`lctrain bench kernels`: time our Triton mixers against fla-core and torch SDPA in one process.

For each sequence length: forward and forward+backward (``triton.testing.do_bench``, median ms)
and the peak extra GPU memory of one forward+backward, for

    ours: delta_rule, gated_delta_rule, gated_linear_attn    (lctrain.kernels, backend="triton")
    fla:  chunk_delta_rule, chunk_gated_delta_rule           (fla-core, imported lazily here only)
    sdpa: torch scaled_dot_product_attention, causal, flash backend

Ratios are ours / fla for the same recurrence, measured in the same process on the same GPU.
fla refuses its gated backward on Triton 3.4 - 3.7.0 on Hopper (its issue #640); when that guard
applies it is lifted for the benchmark and the output says so (our own gradients are checked by
``pytest -m gpu``). Writes the result as JSON with ``--json PATH``, rewritten after every measurement
(marked ``"partial": true`` until the run ends, so a run cut by a time limit or a kill keeps what it
measured); ``--time-limit S`` starts no new measurement after S seconds (the notes name those not run);
``lctrain bench record PATH`` appends it to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from lctrain.bench.report import Clock, bench_main, result_dict, time_limit_seconds, write_partial

OURS = ("delta", "gated_delta", "gla")
FLA_OF = {"delta": "fla_delta", "gated_delta": "fla_gated_delta"}
ALL_METHODS = ("delta", "gated_delta", "gla", "fla_delta", "fla_gated_delta", "sdpa")
COLUMNS = ["T", "method", "fwd ms", "fwd+bwd ms", "peak MiB", "fwd / fla", "fwd+bwd / fla",
           "peak / fla"]


def _parse(argv):
    p = argparse.ArgumentParser(prog="lctrain bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[16384, 32768, 65536, 131072],
                   help="sequence lengths (default: 16K 32K 64K 128K)")
    p.add_argument("--B", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--H", type=int, default=16, help="heads (default 16)")
    p.add_argument("--D", type=int, default=128, help="head dim, for q/k and v (default 128)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS))
    p.add_argument("--no-fla", action="store_true", help="skip fla-core (no ratios then)")
    p.add_argument("--no-sdpa", action="store_true", help="skip torch SDPA")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (default 100)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=INT[,KEY=INT]",
                   help="also time our kernels with these launch settings (see "
                        "lctrain.kernels.triton.ops.set_config), rows named METHOD@NAME; repeatable")
    p.add_argument("--time-limit", type=time_limit_seconds, default=None, metavar="S",
                   help="start no new measurement (T, method) after S seconds; the notes name those not run")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here (rewritten after every "
                   "measurement, marked partial until the run ends)")
    return p.parse_args(argv)


def kernel_versions(fla_version: str | None) -> dict:
    """The versions a kernel bench that compares against fla records."""
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "fla-core": fla_version}


def _load_fla(notes: list[str]):
    """Import fla-core lazily; lift its Hopper/Triton guard on the gated backward if it applies."""
    import importlib.metadata as md

    import torch
    import triton
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from packaging import version
    try:
        fla_version = md.version("fla-core")
    except md.PackageNotFoundError:
        fla_version = "unknown"
    tv = version.parse(triton.__version__)
    hopper = torch.cuda.get_device_capability()[0] == 9
    if hopper and version.parse("3.4.0") <= tv < version.parse("3.7.1"):
        import fla.ops.common.chunk_o as chunk_o
        if hasattr(chunk_o, "TRITON_ABOVE_3_7_1"):
            chunk_o.TRITON_ABOVE_3_7_1 = True
            notes.append(f"fla-core {fla_version}: its guard refusing the gated backward on Hopper with "
                         f"Triton {triton.__version__} (fla issue #640) was lifted by monkeypatch "
                         "(fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True) for this benchmark")
    return chunk_delta_rule, chunk_gated_delta_rule, fla_version


def _make_inputs(B, T, H, D, dtype, device):
    import torch
    import torch.nn.functional as F
    gen = torch.Generator(device=device).manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)
    x = dict(
        q=r(B, T, H, D).to(dtype),
        k=F.normalize(r(B, T, H, D), dim=-1).to(dtype),
        v=r(B, T, H, D).to(dtype),
        g=F.logsigmoid(r(B, T, H) + 3.0),               # float32 log-decay
        beta=torch.sigmoid(r(B, T, H)).to(dtype),
    )
    for t in x.values():
        t.requires_grad_(True)
    x["do"] = r(B, T, H, D).to(dtype)
    return x


def _method_fns(name: str, x: dict, fla) -> tuple[Callable, list]:
    """(forward returning the output, differentiable inputs) of one method."""
    import torch.nn.functional as F

    from lctrain.kernels import delta_rule, gated_delta_rule, gated_linear_attn
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
    if name == "delta":
        return (lambda: delta_rule(q, k, v, beta, backend="triton")[0]), [q, k, v, beta]
    if name == "gated_delta":
        return (lambda: gated_delta_rule(q, k, v, g, beta, backend="triton")[0]), [q, k, v, g, beta]
    if name == "gla":
        return (lambda: gated_linear_attn(q, k, v, g, backend="triton")[0]), [q, k, v, g]
    if name == "ref_delta":  # the chunkwise torch backend: a float32 reference for accuracy
        return (lambda: delta_rule(q, k, v, beta, backend="torch")[0]), [q, k, v, beta]
    if name == "ref_gated_delta":
        return (lambda: gated_delta_rule(q, k, v, g, beta, backend="torch")[0]), [q, k, v, g, beta]
    if name == "ref_gla":
        return (lambda: gated_linear_attn(q, k, v, g, backend="torch")[0]), [q, k, v, g]
    if name == "fla_delta":
        return (lambda: fla[0](q, k, v, beta)[0]), [q, k, v, beta]
    if name == "fla_gated_delta":
        return (lambda: fla[1](q, k, v, g, beta)[0]), [q, k, v, g, beta]
    if name == "sdpa":
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
        return fwd, [qt, kt, vt]
    raise ValueError(name)


def _parse_variants(specs):
    """[(name, {key: int})], the default settings first."""
    out = [("", {})]
    for spec in specs:
        name, _, body = spec.partition(":")
        if not name or not body:
            raise SystemExit(f"--variant {spec!r}: expected NAME:KEY=INT[,KEY=INT]")
        try:
            kv = {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(",") if item)}
        except ValueError:
            raise SystemExit(f"--variant {spec!r}: expected NAME:KEY=INT[,KEY=INT]") from None
        out.append((name, kv))
    return out


def _measure(fwd, inputs, do, warmup, rep):
    import torch
    import triton.testing

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        o = fwd()
        torch.autograd.grad(o, inputs, do)

    fwd_bwd()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    t_fwd = triton.testing.do_bench(fwd_only, warmup=warmup, rep=rep, return_mode="median")
    t_all = triton.testing.do_bench(fwd_bwd, warmup=warmup, rep=rep, return_mode="median")
    return t_fwd, t_all, peak


def _outputs_and_grads(name: str, inputs: dict, fla) -> list:
    """[o, grad of each differentiable input] of one fwd+bwd of `name` with upstream inputs["do"]."""
    import torch
    fwd, leaves = _method_fns(name, inputs, fla)
    o = fwd()
    return [o] + list(torch.autograd.grad(o, leaves, inputs["do"]))


def _float32_inputs(x: dict) -> dict:
    """float32 leaf copies of the (bf16-rounded) inputs: what the "ref_*" methods see."""
    return {n: t.detach().float().requires_grad_(True) for n, t in x.items()}


def _grad_names(method: str) -> list[str]:
    """Names of _outputs_and_grads' entries for one of OURS (fla's methods share delta's / GDN's)."""
    return (["o", "dq", "dk", "dv"] + (["dg"] if method != "delta" else [])
            + (["dbeta"] if method != "gla" else []))


def _rel_diff(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _agreement(x, fla, notes):
    """Same function, and how accurate? Relative difference of ours vs fla (outputs and input
    grads), and of each against the chunkwise torch backend in float32 on the same bf16 inputs."""
    print("checking ours against fla (fla's first call autotunes: this can take minutes)", flush=True)
    xr = _float32_inputs(x)
    T = x["q"].shape[1]
    for ours, theirs in (("delta", "fla_delta"), ("gated_delta", "fla_gated_delta")):
        mine, other = _outputs_and_grads(ours, x, fla), _outputs_and_grads(theirs, x, fla)
        ref = _outputs_and_grads("ref_" + ours, xr, fla)
        names = _grad_names(ours)

        def fmt(a_list, b_list, names=names):
            return ", ".join(f"{n} {_rel_diff(a, b):.1e}" for n, a, b in zip(names, a_list, b_list))
        notes.append(f"agreement {ours} vs {theirs} at T={T}: rel diff " + fmt(mine, other))
        notes.append(f"accuracy vs float32 torch reference at T={T}: {ours}: " + fmt(mine, ref)
                     + f"; {theirs}: " + fmt(other, ref))


def run(args) -> dict:
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("lctrain bench kernels needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    notes: list[str] = []
    methods = [m for m in args.methods if not (args.no_fla and m.startswith("fla_"))
               and not (args.no_sdpa and m == "sdpa")]
    fla = None
    fla_version = None
    if any(m.startswith("fla_") for m in methods):
        try:
            *fla, fla_version = _load_fla(notes)
        except ImportError as e:
            notes.append(f"fla-core not importable ({e}); fla rows skipped")
            methods = [m for m in methods if not m.startswith("fla_")]
    from lctrain.kernels.triton import ops as triton_ops
    variants = _parse_variants(args.variant)
    for _, kv in variants:  # validate before any timing
        triton_ops.set_config(**triton_ops.set_config(**kv))
    runs = [(m, "", {}) for m in methods]
    runs += [(m, name, kv) for name, kv in variants[1:] for m in methods if m in OURS]
    labels = [f"{m}@{vname}" if vname else m for m, vname, _ in runs]
    if len(variants) > 1:
        notes.append("variants (METHOD@NAME rows): " + "; ".join(f"{name} = {kv}" for name, kv in variants[1:]))
    measured: list[tuple[int, dict]] = []  # (T, {label: (fwd ms, fwd+bwd ms, peak MiB) or None}) in --T order
    clock, skipped = Clock(args.time_limit, "bench kernels"), []
    dev = torch.cuda.get_device_name()

    def result(final_notes=()):
        return result_dict(
            f"Kernels: fwd / fwd+bwd, B={args.B} H={args.H} D={args.D} {args.dtype}",
            "lctrain bench kernels " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
            dev, kernel_versions(fla_version),
            notes + list(final_notes) + ["times: triton.testing.do_bench median; peak MiB: max extra GPU memory "
                                         "allocated during one fwd+bwd beyond the inputs; ratios: ours / fla "
                                         "(fla_delta for delta, fla_gated_delta for gated_delta)"],
            COLUMNS, *_table(measured))

    for i, T in enumerate(args.T):
        if clock.out_of_time():
            skipped += [f"T={T} (all)"]
            continue
        x = _make_inputs(args.B, T, args.H, args.D, dtype, "cuda")
        if i == 0 and fla is not None:
            _agreement(x, fla, notes)
        res: dict = {}
        measured.append((T, res))
        for (m, vname, kv), label in zip(runs, labels):
            if clock.out_of_time():
                skipped.append(f"T={T} {label}")
                continue
            fwd, inputs = _method_fns(m, x, fla)
            previous = triton_ops.set_config(**kv) if vname else None
            try:
                res[label] = _measure(fwd, inputs, x["do"], args.warmup, args.rep)
            except torch.cuda.OutOfMemoryError:
                res[label] = None
                notes.append(f"{label} at T={T}: out of memory")
            finally:
                if previous is not None:
                    triton_ops.set_config(**previous)
            del fwd, inputs
            torch.cuda.empty_cache()
            r = res[label]
            print(f"T={T} {label}: " + ("OOM" if r is None else
                                        f"fwd {r[0]:.3f} ms, fwd+bwd {r[1]:.3f} ms, peak {r[2]:.0f} MiB"),
                  flush=True)
            write_partial(result(), args.json, sum(len(r) for _, r in measured), len(args.T) * len(runs),
                          "measurements (T, method)")
        del x
        torch.cuda.empty_cache()
    return result(clock.not_run_note(skipped))


def _table(measured: list) -> tuple[list, list]:
    """(rows, raw) of the measurements so far, by T then in the order measured; a ratio needs fla's
    measurement at the same T (None until it is there)."""
    rows, raw = [], []
    for T, res in measured:
        for m, r in res.items():
            ref = res.get(FLA_OF.get(m.split("@")[0], ""))
            ratio = lambda j, r=r, ref=ref: (round(r[j] / ref[j], 3) if (r is not None and ref is not None) else None)
            rows.append([T, m,
                         None if r is None else round(r[0], 3),
                         None if r is None else round(r[1], 3),
                         None if r is None else round(r[2], 1),
                         ratio(0), ratio(1), ratio(2)])
            raw.append({"T": T, "method": m, "fwd_ms": None if r is None else r[0],
                        "fwd_bwd_ms": None if r is None else r[1],
                        "peak_mib": None if r is None else r[2]})
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    return bench_main(_parse, run, argv)


if __name__ == "__main__":
    sys.exit(main())
