"""`python -m lctrain.bench.cp_parts`: the passes that context parallelism adds, timed alone on one GPU.

Under CP every rank runs, besides the plain op, a state pass over its shard (``shard_transition``:
the shard's affine map (A, B)) in the forward and a state-gradient pass (``shard_state_grad``) in
the backward (docs/design.md §5). This times each way of running them, without NCCL or a second
GPU, so that the fastest can be picked per sequence length:

- ``op``: the plain op's forward and forward+backward at T (what CP's time is compared with), and
  with ``overlap`` in ``--transition`` the overlapped op (kernels/triton/cp_overlap.py: the passes
  carry the transition, then fix-ups; no separate state passes) with a fixed incoming state and
  outgoing-state gradient: its 'x sequential' is its time over the plain op's, what that
  transition costs a rank besides the two all-gathers (again under each ``--cfg`` of its own
  passes' keys: BVSC, stages_seqc, BVSBC, stages_seqbc, ...);
- ``transition``: each ``--transition`` way of the state pass (``sequential``, ``grouped:G``, ...),
  and the sequential one under each ``--cfg`` launch-setting override of the Triton state kernels
  (e.g. ``BVSC=16``: more, narrower programs; ``stages_seqc=3``: less shared memory per program);
  ``final state``: the A-free pass (``shard_final_state``: the plain forward's state pass, launch
  key ``state_fwd``, e.g. ``BVS=32``) that rank 0 runs instead under the sequential transition (its
  'x sequential' is its time over the default (A, B) pass's);
- ``state grad``: the same for the state-gradient pass (``grouped+grad:G`` groups it).

Every row also gives its largest difference from the sequential pass's result, relative to the
largest entry of that result (the ways differ only by float rounding). Rows are printed as they are
measured, the JSON (``--json``) is rewritten after every row (marked ``"partial": true`` until the run
ends) and ``--time-limit S`` starts no new row after S seconds (the notes name the cases not run), so a
run cut short still leaves data. ``--record`` appends the result to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
import time

from lctrain.bench.report import Clock, bench_main, error_note, result_dict, utc_date, write_partial

COLUMNS = ["layer", "T", "pass", "way", "ms", "x sequential", "rel diff"]
KINDS = {"gdn": "gated_delta", "delta": "delta", "gla": "gla"}
DEFAULT_CFGS = ("BVS=32", "BVSC=16", "BVSC=64", "stages_seqc=3", "BVSBC=16", "BVSBC=64", "stages_seqbc=2",
                "warps_seqbc=4", "BVF=64", "fuse_out=1", "BVSB=32", "stages_seqb=1")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m lctrain.bench.cp_parts", description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", nargs="+", choices=list(KINDS), default=["gdn"])
    p.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536], help="shard lengths")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--backend", default="auto")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--transition", nargs="+", default=["overlap", "grouped:4", "grouped:8", "grouped:16", "grouped:32",
                                                   "grouped+grad:8", "grouped+grad:16", "direct"],
                   help="ways to time besides sequential (context_parallel's transition names); "
                        "grouped+grad:G also times the grouped state-gradient pass; direct: gla's closed form (other "
                        "layers skip it with a note); overlap: the overlapped op against the plain op (Triton)")
    p.add_argument("--cfg", nargs="*", default=list(DEFAULT_CFGS),
                   help="Triton launch overrides (KEY=INT[,KEY=INT], lctrain.kernels.triton.ops.set_config) under "
                        "which the passes are timed again: state_fwd_cp keys (BVSC, ...) change the transition of the "
                        "delta rules and overlap's forward pass, state_fwd's (BVS, ...) gla's transition, state_bwd's "
                        "(BVSB, ...) the state-gradient pass, state_bwd_cp's (BVSBC, ...) overlap's reverse pass, "
                        "BVF / fuse_out its fix-up")
    p.add_argument("--no-op", action="store_true", help="skip the plain op's times")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=None, metavar="S", help="start no new row after S seconds")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--record", nargs="?", const="BENCHMARKS.md", metavar="MD")
    args = p.parse_args(argv)
    from lctrain.parallel.context_parallel import ContextParallelError, _parse_transition
    for t in args.transition:
        try:
            _parse_transition(t)
        except ContextParallelError as err:
            p.error(f"--transition: {err}")
    args.cfg = [_parse_cfg(p, c) for c in args.cfg]
    bad = [t for t in args.T if t < 1 or t % args.chunk_size]
    if bad:
        p.error(f"--T {bad}: shard lengths must be positive multiples of --chunk-size {args.chunk_size}")
    if args.warmup < 0 or args.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    return args


def _parse_cfg(p, spec: str) -> dict:
    from lctrain.kernels.triton.ops import KERNEL_KEYS
    keys = {k for ks in KERNEL_KEYS.values() for k in ks}
    try:
        cfg = {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(",") if item)}
    except ValueError:
        p.error(f"--cfg {spec!r}: expected KEY=INT[,KEY=INT]")
    unknown = sorted(set(cfg) - keys)
    if unknown or not cfg:
        p.error(f"--cfg {spec!r}: unknown or no keys {unknown}; choose from {sorted(keys)}")
    return cfg


def _timed_ms(fn, warmup: int, iters: int, device) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, wall clock otherwise)."""
    import statistics

    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rel(got, want) -> float:
    if isinstance(got, tuple):
        return max(_rel(a, b) for a, b in zip(got, want))
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def run(args):
    import torch

    from lctrain.bench.cp import _version
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    kw = dict(backend=args.backend, chunk_size=args.chunk_size)
    clock = Clock(args.time_limit, "cp_parts")
    cases = [(layer, T) for layer in args.layer for T in args.T]
    done = [0, 0]  # cases (layer, T) finished, rows of the case in progress
    rows, notes = [], [f"B={args.B}, H={args.H}, head dim {args.D}, {args.dtype}, backend {args.backend}, chunk "
                           f"{args.chunk_size}, {args.warmup} warm-up + {args.iters} timed iterations, one device; "
                           "'x sequential': time / the sequential pass's; 'rel diff': max |difference| from the "
                           "sequential pass's result / max |that result|"]
    result = result_dict("CP state passes alone, one device", "python -m lctrain.bench.cp_parts " + " ".join(args.argv),
                         torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                         {"torch": torch.__version__, "triton": _version("triton")}, notes, COLUMNS, rows,
                         date=utc_date())

    out_of_time = clock.out_of_time

    def add(layer, T, what, way, ms, base, diff):
        rows.append([layer, T, what, way, round(ms, 4), None if base is None else round(ms / base, 3),
                     None if diff is None else float(f"{diff:.2e}")])
        print(f"{layer} T {T} {what} [{way}]: {ms:.3f} ms" + ("" if base is None else f", x{ms / base:.3f}")
              + ("" if diff is None else f", rel diff {diff:.1e}"), flush=True)
        done[1] += 1
        write_partial(result, args.json, done[0], len(cases),
                      "cases (layer, T)" + (f", plus {done[1]} rows of the next" if done[1] else ""))

    for i, (layer, T) in enumerate(cases):
        if out_of_time():
            notes.extend(clock.not_run_note([f"{la} at T {t}" for la, t in cases[i:]]))
            break
        clock.progress(f"{layer} at T {T}")
        _case(layer, T, args, kw, device, dtype, add, notes, out_of_time)
        done[:] = [done[0] + 1, 0]
        write_partial(result, args.json, done[0], len(cases), "cases (layer, T)")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _case(layer, T, args, kw, device, dtype, add, notes, out_of_time):
    """Every row of one layer at shard length T."""
    import torch

    from lctrain import kernels
    from lctrain.bench.cp import _inputs
    from lctrain.kernels.triton import ops as triton_ops
    from lctrain.parallel import context_parallel
    from lctrain.parallel.context_parallel import IN_OP_TRANSITIONS, ContextParallelError
    kind = KINDS[layer]
    op = {"gated_delta": kernels.gated_delta_rule, "delta": kernels.delta_rule, "gla": kernels.gated_linear_attn}[kind]
    names = {"gdn": ("g", "beta"), "delta": ("beta",), "gla": ("g",)}[layer]
    x = _inputs(args.B, T, args.H, args.D, dtype, device, seed=T)
    gates = dict(g=x["g"] if "g" in names else None, beta=x["beta"] if "beta" in names else None)
    inputs = [x[n] for n in ("q", "k", "v") + names]
    op_ms = {}
    if not args.no_op or "overlap" in args.transition:
        with torch.no_grad():
            op_ms["fwd"] = _timed_ms(lambda: op(*inputs, **kw), args.warmup, args.iters, device)
        op_ms["fwd+bwd"] = _timed_ms(lambda: torch.autograd.grad(op(*inputs, **kw)[0], inputs, x["do"]),
                                     args.warmup, args.iters, device)
        for what, ms in op_ms.items():
            add(layer, T, "op", what, ms, None, None)
    if "overlap" in args.transition:
        for cfg in [{}] + [c for c in args.cfg if _cfg_touches(c, "overlap")]:
            if out_of_time():
                notes.append(f"--time-limit {args.time_limit:g} s reached: {layer} at T {T}: overlap "
                             f"{','.join(f'{k}={v}' for k, v in cfg.items()) or '(defaults)'} and later rows not run")
                break
            previous = triton_ops.set_config(**cfg)
            try:
                _time_overlap(layer, T, x, names, kw, args, device, add, notes, op_ms, cfg)
            finally:
                triton_ops.set_config(**previous)
    ways = ([("sequential", {})] + [(t, {}) for t in args.transition if t not in IN_OP_TRANSITIONS]
            + [("sequential", c) for c in args.cfg])
    base = {}
    for transition, cfg in ways:
        label = transition + ("" if not cfg else " " + ",".join(f"{k}={v}" for k, v in cfg.items()))
        if out_of_time():
            notes.append(f"--time-limit {args.time_limit:g} s reached: {layer} at T {T}: {label} and later rows "
                         "not run")
            break
        try:
            cp_op = context_parallel(op, None, transition=transition)
        except ContextParallelError as err:  # "direct" for a delta rule
            notes.append(f"{layer} [{label}] not measured: {err}")
            continue
        previous = triton_ops.set_config(**cfg)
        try:
            for what, key, fn in (
                    ("transition", cp_op.pass_keys()[0], lambda: cp_op._transition(  # noqa: B023
                        x["k"], x["v"], gates["g"], gates["beta"], kw["backend"], kw["chunk_size"])),
                    ("state grad", cp_op.pass_keys()[1], lambda: cp_op._state_grad(  # noqa: B023
                        x["q"], x["k"], x["v"], x["do"], gates["g"], gates["beta"], None, kw["backend"],
                        kw["chunk_size"]))):
                if key == "sequential" and transition != "sequential" or cfg and not _cfg_touches(cfg, what):
                    continue  # the same pass as a row already measured
                out = fn()
                ms = _timed_ms(fn, args.warmup, args.iters, device)
                if key == "sequential" and not cfg:
                    base[what] = (ms, out)
                ref_ms, ref = base[what]
                add(layer, T, what, label, ms, ref_ms, _rel(out, ref))
                if what == "transition" and transition == "sequential" and (not cfg or _cfg_touches(cfg, "final")):
                    # what rank 0 runs instead: B alone (its incoming state is known), against the (A, B) pass's B
                    final = lambda: kernels.shard_final_state(kind, x["k"], x["v"], **gates, **kw)  # noqa: E731
                    fs = final()
                    add(layer, T, "final state", label, _timed_ms(final, args.warmup, args.iters, device),
                        base["transition"][0], _rel(fs, base["transition"][1][1]))
        except Exception as err:  # noqa: BLE001 - e.g. a launch setting that does not fit: say so, go on
            notes.append(f"{layer} T {T} [{label}] failed: {error_note(err)}")
            print(notes[-1], flush=True)
        finally:
            triton_ops.set_config(**previous)


class _FixedLink:
    """The two exchanges of the overlapped op (transition="overlap") on one device: a fixed incoming
    state and outgoing-state gradient, so that its fix-ups run as under CP (a middle rank's work),
    without communication."""
    start_known = start_first = False  # as on a middle rank: the prefix pass, then the fix-up
    end_first = False  # as on a middle rank: the suffix pass, then the fix-up

    def __init__(self, S, dS):
        self.S, self.dS = S, dS

    def end_known(self, u):
        return False  # as on a rank before the last: the suffix pass, then the fix-up

    def start(self, A, B):
        return self.S

    def end(self, G, At, u):
        return self.dS


def _time_overlap(layer, T, x, names, kw, args, device, add, notes, op_ms, cfg):
    """The overlapped op (its state passes carry the transition, then fix-ups) against the plain op:
    what transition="overlap" costs a rank besides the two all-gathers."""
    import torch

    from lctrain.kernels.triton.cp_overlap import overlapped
    try:
        B, _, H, K = x["k"].shape
        gen = torch.Generator(device=device).manual_seed(T + 1)
        S, dS = (0.1 * torch.randn(B, H, K, x["v"].shape[-1], generator=gen, device=device) for _ in range(2))
        link = _FixedLink(S, dS)
        args5 = {n: x[n] for n in ("q", "k", "v") + names}
        inputs = list(args5.values())
        run = lambda: overlapped(x["q"], x["k"], x["v"], args5.get("g"), args5.get("beta"), link=link,  # noqa: E731
                                 chunk_size=kw["chunk_size"])[0]
        label = "overlap" + ("" if not cfg else " " + ",".join(f"{k}={v}" for k, v in cfg.items()))
        with torch.no_grad():
            ms = _timed_ms(run, args.warmup, args.iters, device)
        add(layer, T, "op", "fwd " + label, ms, op_ms.get("fwd"), None)
        ms = _timed_ms(lambda: torch.autograd.grad(run(), inputs, x["do"]), args.warmup, args.iters, device)
        add(layer, T, "op", "fwd+bwd " + label, ms, op_ms.get("fwd+bwd"), None)
    except Exception as err:  # noqa: BLE001 - e.g. no Triton here: say so, go on
        notes.append(f"{layer} T {T} [overlap] failed: {error_note(err)}")
        print(notes[-1], flush=True)


def _cfg_touches(cfg: dict, what: str) -> bool:
    """Whether launch overrides change the kernels of this pass (state_fwd / wy for the transition,
    state_bwd / dv_local / wy for the state gradient)."""
    from lctrain.kernels.triton.ops import KERNEL_KEYS
    kernels = {"transition": ("state_fwd", "state_fwd_cp", "wy_solve", "wy_apply"),
               "state grad": ("state_bwd", "dv_local", "wy_solve", "wy_apply"),
               "overlap": ("state_fwd_cp", "state_bwd_cp", "state_fixup"),
               "final": ("state_fwd", "wy_solve", "wy_apply")}[what]
    return any(key in KERNEL_KEYS[k] for k in kernels for key in cfg)


def main(argv: list[str] | None = None) -> int:
    return bench_main(_parse, run, argv)


if __name__ == "__main__":
    sys.exit(main())
