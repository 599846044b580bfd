"""Developer tool (issue 12): the gated forward's state pass in several variants, timed in one process.

    python -m lctrain.bench.variants [--ops gated_delta delta] [--T 131072] [--rounds 5] [--json PATH]

After the kernels were split by stage, gated_delta's forward got ~1.6% slower on an H200 (4.43 ->
4.50 ms at 128K). The only kernel whose machine code changed is state_fwd; compiled for sm_90 by
Triton 3.6, what changed its chunk loop is the A store after the loop: compiled out where no CP
transition is wanted (a_ptr None, COMPUTE_A False), the loop is scheduled differently (with a
None s0 / final state / boundaries and a one-element tensor in their place, the code is
identical, so None arguments as such are not the cause). state_fwd now always keeps the store
(a one-element a_ptr without A programs), and its loop is byte-identical to the one-file
version's for the three mixers. Separate processes on one machine differ by about as much as
the effect, so every variant here is timed in ONE process, in alternating rounds (the order
rotated each round), on the same inputs:

    current    the kernels of this checkout
    TREE       (--tree NAME:DIR, default presplit and split where their folders exist) the state_fwd
               launcher of another kernels/triton tree, imported as a package from DIR:
               presplit = 5404906 (one file, before the split), split = df18be3 (split, A store
               compiled out): make them with `git archive COMMIT kernels/triton | tar x -C .device/NAME`
    stagesN / warps8   current at num_stages N (Triton's default is 3) / 8 warps
    NAME (--variant NAME:KEY=INT,...)   current under other launch settings (ops.set_config)

Columns per variant: fwd ms, fwd+bwd ms (``triton.testing.do_bench`` medians; the median of the
rounds' medians and the spread min..max over rounds), state_fwd alone (one launch on the forward's
own W, U, gam) and the ratios to presplit (or current without it). Every variant's output is
checked against current's first (a variant that computes something else stops the run). ``--json`` is
rewritten after every round (marked ``"partial": true`` until the run ends) and ``--time-limit S`` starts
no new round after S seconds, so a run cut short keeps the rounds it timed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys

from lctrain.bench.kernels import _make_inputs, _parse_variants, kernel_versions
from lctrain.bench.report import Clock, bench_main, result_dict, time_limit_seconds, write_partial

TREES = ("presplit:.device/presplit/kernels/triton", "split:.device/split/kernels/triton")
COLUMNS = ["op", "variant", "fwd ms", "fwd range", "fwd+bwd ms", "fwd+bwd range", "state_fwd ms",
           "fwd / base", "fwd+bwd / base", "state_fwd / base"]
SETTINGS = {"stages2": {"stages_seq": 2}, "stages4": {"stages_seq": 4}, "warps8": {"warps_seq": 8}}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m lctrain.bench.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=131072, help="sequence length (default 128K)")
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--ops", nargs="+", choices=["gated_delta", "delta"], default=["gated_delta"])
    p.add_argument("--tree", action="append", metavar="NAME:DIR",
                   help="a kernels/triton folder whose state_fwd to time as variant NAME; repeatable "
                        f"(default {' '.join(TREES)}, each skipped with a note where DIR is absent)")
    p.add_argument("--settings", nargs="*", choices=list(SETTINGS), default=list(SETTINGS),
                   help="launch-setting variants of current (default all)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=INT[,KEY=INT]",
                   help="also time current under these launch settings (ops.set_config); repeatable")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--rep", type=int, default=150, help="do_bench repetition time of the forward, ms "
                   "(fwd+bwd: twice that)")
    p.add_argument("--time-limit", type=time_limit_seconds, default=None, metavar="S",
                   help="start no new round after S seconds (an op's rows then hold the rounds that ran; the notes "
                        "name those not run)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here (rewritten after every round, "
                   "marked partial until the run ends)")
    args = p.parse_args(argv)
    if args.tree is None:
        args.tree = list(TREES)
    for spec in args.tree:
        if ":" not in spec or not spec.split(":", 1)[0] or not spec.split(":", 1)[1]:
            p.error(f"--tree {spec!r}: expected NAME:DIR")
    return args


def load_tree_state_fwd(path: str, name: str):
    """The state_fwd launcher (``ops._state_fwd``) of the kernels/triton package at ``path``,
    imported under the package name ``name`` (its kernels compile from its own files), with ops'
    calling convention: one sequence only (``varlen`` None, which older trees do not take)."""
    init = os.path.join(path, "__init__.py")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[path])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    fn = importlib.import_module(name + ".ops")._state_fwd

    def state_fwd(*args, varlen=None, **kw):
        if varlen is not None:
            raise ValueError(f"variants: the state_fwd of {path} is timed on one sequence (no cu_seqlens)")
        return fn(*args, **kw)
    return state_fwd


def _variants(args, notes):
    """[(name, state_fwd launcher or None for ops' own, set_config overrides)]."""
    out = [("current", None, {})]
    for spec in args.tree:
        name, path = spec.split(":", 1)
        if not os.path.exists(os.path.join(path, "__init__.py")):
            notes.append(f"{name} skipped: no kernels/triton package at {path} (make one with `mkdir -p "
                         f".device/{name} && git archive COMMIT kernels/triton | tar x -C .device/{name}`)")
            continue
        out.append((name, load_tree_state_fwd(path, f"lctrain_variant_{name}"), {}))
    out += [(name, None, SETTINGS[name]) for name in args.settings]
    out += [(name, None, kv) for name, kv in _parse_variants(args.variant)[1:]]
    return out


class _Using:
    """Context: ops runs state_fwd through ``launcher`` (when given) under launch settings ``kv``."""

    def __init__(self, launcher, kv):
        self.launcher, self.kv = launcher, kv

    def __enter__(self):
        from lctrain.kernels.triton import ops
        self.saved_fn, self.saved_cfg = ops._state_fwd, ops.set_config(**self.kv)
        if self.launcher is not None:
            ops._state_fwd = self.launcher

    def __exit__(self, *exc):
        from lctrain.kernels.triton import ops
        ops._state_fwd = self.saved_fn
        ops.set_config(**self.saved_cfg)


def _fns(op, x):
    """(forward, differentiable inputs, state_fwd alone) of one op on inputs x."""
    import torch

    from lctrain.kernels import delta_rule, gated_delta_rule
    from lctrain.kernels.triton import ops
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
    gated = op == "gated_delta"
    if gated:
        fwd, inputs = (lambda: gated_delta_rule(q, k, v, g, beta, backend="triton")[0]), [q, k, v, g, beta]
    else:
        fwd, inputs = (lambda: delta_rule(q, k, v, beta, backend="triton")[0]), [q, k, v, beta]
    kd, vd = k.detach(), v.detach()
    gd = g.detach().float() if gated else None
    bd = beta.detach().float()

    def state_alone():
        cfg = ops._Cfg(kd.shape[-1], vd.shape[-1], gated=gated)
        with torch.no_grad():
            gam, _tm, w, ut = ops._wy_fwd(kd, vd, gd, bd, cfg)
        return lambda: ops._state_fwd(kd, w, ut, gam, None, cfg, store_h=True, store_vnew=True,
                                      store_final=False)
    return fwd, inputs, state_alone


def _time_one(fwd, inputs, do, state_alone, rep):
    import torch
    import triton.testing

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        torch.autograd.grad(fwd(), inputs, do)
    bench = lambda f, r: triton.testing.do_bench(f, warmup=10, rep=r, return_mode="median")  # noqa: E731
    sf = state_alone()
    return bench(fwd_only, rep), bench(fwd_bwd, 2 * rep), bench(sf, rep)


def run(args) -> dict:
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("python -m lctrain.bench.variants needs a CUDA GPU")
    notes: list[str] = []
    variants = _variants(args, notes)
    for n in notes:
        print("note:", n, flush=True)
    x = _make_inputs(1, args.T, args.H, args.D, torch.bfloat16, "cuda")
    timed: list[tuple[str, dict]] = []  # (op, {variant: [(fwd, fwd+bwd, state_fwd) ms per round]})
    clock, skipped = Clock(args.time_limit, "variants"), []
    notes.append("settings of each variant: " + "; ".join(f"{n} = {kv or 'defaults'}" + ("" if lf is None else
                                                          " (own launcher)") for n, lf, kv in variants))
    notes.append(f"times: triton.testing.do_bench medians, the median over the rounds (--rounds {args.rounds}, "
                 "alternating, the order rotated each round); range: min..max over rounds")

    def result(final_notes=()):
        rows, raw, bases = _table(timed)
        return result_dict(
            f"state_fwd variants (issue 12): T={args.T} H={args.H} D={args.D} bf16",
            "python -m lctrain.bench.variants " + " ".join(args.argv),
            torch.cuda.get_device_name(), kernel_versions(None),
            notes + [f"{op}: ratios against {base}" for op, base in bases] + list(final_notes), COLUMNS, rows, raw)

    for i, op in enumerate(args.ops):
        if clock.out_of_time():
            skipped += args.ops[i:]
            break
        fwd, inputs, state_alone = _fns(op, x)
        with torch.no_grad():
            ref = fwd().float()
        for name, launcher, kv in variants:  # compile each once, and check it computes the same
            with _Using(launcher, kv):
                with torch.no_grad():
                    o = fwd().float()
                torch.autograd.grad(fwd(), inputs, x["do"])
                state_alone()()
            diff = float((o - ref).norm() / ref.norm())
            print(f"{op} {name}: output vs current, rel diff {diff:.1e}", flush=True)
            if diff > 1e-3:  # the same math in the same order: equal up to bf16 rounding
                raise SystemExit(f"variant {name} computes something else (rel diff {diff:.1e} vs current)")
            notes.append(f"{op} {name}: output vs current rel diff {diff:.1e}")
        torch.cuda.synchronize()
        times = {name: [] for name, _, _ in variants}
        timed.append((op, times))
        for r in range(args.rounds):
            if clock.out_of_time():
                skipped.append(f"{op} rounds {r + 1}..{args.rounds}")
                break
            shift = r % len(variants)
            for name, launcher, kv in variants[shift:] + variants[:shift]:
                with _Using(launcher, kv):
                    t = _time_one(fwd, inputs, x["do"], state_alone, args.rep)
                times[name].append(t)
                print(f"round {r} {op} {name}: fwd {t[0]:.3f} ms, fwd+bwd {t[1]:.3f} ms, state_fwd {t[2]:.3f} ms",
                      flush=True)
            write_partial(result(), args.json, i * args.rounds + r + 1, len(args.ops) * args.rounds,
                          "rounds (op, round)")
        del fwd, inputs, state_alone
    return result(clock.not_run_note(skipped))


def _table(timed: list) -> tuple[list, list, list]:
    """(rows, raw, [(op, the variant its ratios divide by)]) of the rounds so far (an op before its first
    round has no rows)."""
    rows, raw, bases = [], [], []
    for op, times in timed:
        if not any(times.values()):
            continue
        med = {n: [statistics.median(t[j] for t in ts) for j in range(3)] for n, ts in times.items()}
        base = "presplit" if "presplit" in med else next(iter(med))
        bases.append((op, base))
        for name, ts in times.items():
            m = med[name]
            span = lambda j, ts=ts: f"{min(t[j] for t in ts):.3f}..{max(t[j] for t in ts):.3f}"  # noqa: E731
            rows.append([op, name, round(m[0], 3), span(0), round(m[1], 3), span(1), round(m[2], 3),
                         *(round(m[j] / med[base][j], 4) for j in range(3))])
            raw.append({"op": op, "variant": name, "rounds": [list(t) for t in ts]})
    return rows, raw, bases


def main(argv: list[str] | None = None) -> int:
    return bench_main(_parse, run, argv)


if __name__ == "__main__":
    sys.exit(main())
