"""`lctrain bench cp`: weak scaling of a context-parallel layer, forward + backward.

Layers (``--layer``, several at once): ``gdn`` (gated delta rule), ``delta``, ``gla`` through
``context_parallel``; ``swa`` (sliding-window attention, ``--window``) through the halo exchange and
``attn`` (global causal attention) through Ulysses, both as the model's Attention block runs them.
For the linear mixers ``--transition`` times each given way of computing a shard's (A, B)
(``sequential``, ``grouped``, ``grouped:G``, ...; ``sequential_all``: the reference in which every rank runs
every pass) as its own row.

For each per-rank length T: the plain op on one device at T against ``context_parallel`` over N ranks
at N*T (every rank holds T tokens), so the ideal CP time equals the one-device time and

    weak-scaling efficiency = time(1 device, T) / time(CP = N, N*T)      (target >= 0.85)

Times are medians over iterations of the slowest rank (a CP step ends when its last rank ends); the
one-device time is the same plain op run on every rank at once, averaged over ranks. The state pass
and state-gradient pass are also timed alone, each rank running what it runs under CP (rank 0 the
A-free pass from its initial state, middle ranks (A, B), the last rank nothing; in the backward
rank 0 nothing, the others G), the slowest rank's time: with the two small all-gathers they are all
that CP adds to the plain op's forward and backward. Peak memory is
the largest per-device peak of one forward+backward, the layer's inputs (q, k, v, gates, do) included.
For ``swa`` and ``attn`` one device at the total length N*T is always timed too (``--strong`` for the
linear mixers): strong scaling, ``CP time / 1-dev at T total`` (Ulysses' target: <= 0.55 at 128K total), and
``CP peak / 1-dev at T total`` (<= 0.55); their forward is timed with autograd on, and each stage's first
call (FlexAttention's compile for a new shape, on CUDA) runs alone between progress lines. ``--fla``
times fla-core's own CP (``fla.ops.cp``) side by side (benchmark-only dependency, never imported by lctrain
itself); its first calls autotune for minutes, so it is off by default and best run in its own invocation.

Each row is printed when measured, progress lines go to stderr, ``--json`` is rewritten after every
row (marked ``"partial": true`` until the run ends; rank 0 writes) and ``--time-limit S`` starts no new
case after S seconds (every rank stops at the same case; the notes name what was not run): a run cut short
leaves what it measured, which ``lctrain bench record`` takes (lctrain.bench.report).

Run on N GPUs: ``lctrain bench cp --nproc 2`` (launches torchrun itself; or run it under torchrun).
``--device cpu`` runs the same code on gloo at tiny sizes so that it is exercised without GPUs.
``--json PATH`` writes the result; ``--record`` also appends it to BENCHMARKS.md (lctrain.bench.report).
``--op loglinear_gated_delta_rule`` times the log-linear Gated DeltaNet instead of ``--layer`` (T per
rank a power of two; level weights L = bit_length(N*T - 1) + 1; its state-gradient pass and fla rows are not
timed, nor its state pass where the ranks take the transition tree, which runs none: its exchanges are inside
the timed call).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import subprocess
import sys
import time

from lctrain.bench.report import Clock, error_note, publish, result_dict, time_limit_seconds, write_partial

COLUMNS = ["layer", "transition", "T/rank", "T total", "1-dev fwd ms", "1-dev fwd+bwd ms", "CP fwd ms", "CP fwd+bwd ms",
           "efficiency",
           "state pass ms", "state-grad pass ms", "1-dev peak MiB", "CP peak MiB", "fla 1-dev fwd+bwd ms",
           "fla CP fwd+bwd ms", "fla efficiency",
           "1-dev at T total fwd+bwd ms", "1-dev at T total peak MiB", "CP time / 1-dev at T total",
           "CP peak / 1-dev at T total"]
LAYERS = ("gdn", "delta", "gla", "swa", "attn")
LINEAR = {"gdn": "gated_delta", "delta": "delta", "gla": "gla"}
TITLES = {"gdn": "gated delta rule", "delta": "delta rule", "gla": "gated linear attention",
          "swa": "sliding-window attention",
          "attn": "global attention", "loglinear": "loglinear gated delta rule"}
GPU_DEFAULTS = dict(T=[8192, 16384, 32768, 65536], H=16, D=128, dtype="bf16", chunk_size=64, warmup=5, iters=20,
                    window=2048)
CPU_DEFAULTS = dict(T=[64, 128], H=2, D=16, dtype="fp32", chunk_size=16, warmup=1, iters=3, window=16)


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
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations")
    p.add_argument("--iters", type=int, default=None, help="timed iterations")
    p.add_argument("--layer", nargs="+", choices=LAYERS, default=["gdn"],
                   help="layers to time (default gdn): gdn delta gla (affine scan), swa (halo), attn (Ulysses)")
    p.add_argument("--transition", nargs="+", default=["sequential"],
                   help="linear mixers: how each shard's state passes run, one row each: sequential, grouped (the "
                        "forward's (A, B) by parallel chunk groups), grouped+grad (the backward's state gradient "
                        "too); ':G' fixes G chunk groups, e.g. grouped:8; direct (gla only: closed form, one "
                        "matmul per pass; other layers skip it with a note); overlap (Triton: both passes inside the "
                        "op's own, no separate pass: its state-pass columns stay empty); pipeline (Triton: overlap "
                        "where the last rank waits for S_in and rank 0 for dS_out, then plain passes); sequential_all "
                        "(the reference: sequential with every rank running every pass, nothing skipped); auto (the "
                        "default of context_parallel and the model: pipeline at 2 ranks on Triton, else sequential)")
    p.add_argument("--op", choices=["gated_delta_rule", "loglinear_gated_delta_rule"], default="gated_delta_rule",
                   help="loglinear_gated_delta_rule: time the log-linear Gated DeltaNet instead of --layer")
    p.add_argument("--window", type=int, default=None, help="swa: window in tokens (GPU default 2048, CPU 16)")
    p.add_argument("--strong", action="store_true",
                   help="also time one device at the total length P*T (always on for swa and attn): strong scaling "
                        "and the peak-memory ratio at equal total length")
    p.add_argument("--fla", action="store_true",
                   help="also time fla-core's CP (off by default: its first calls autotune for minutes, so time "
                        "it in its own invocation, e.g. `lctrain bench cp --nproc 2 --fla --T 16384`)")
    p.add_argument("--time-limit", type=time_limit_seconds, default=None, metavar="S",
                   help="start no new case (layer, T, transition) after S seconds; what was measured is written")
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
    from lctrain.parallel.context_parallel import ContextParallelError, _parse_transition
    for t in args.transition:
        try:
            _parse_transition(t)
        except ContextParallelError as err:
            p.error(f"--transition: {err}")
    if args.window < 1:
        p.error("--window must be >= 1")
    if "swa" in args.layer and min(args.T) < args.window - 1:
        p.error(f"--layer swa: the halo of --window {args.window} (window - 1 keys) must fit in one rank's shard; "
                f"--T {min(args.T)} is shorter: pass --T >= {args.window - 1} or a smaller --window")
    bad = [t for t in args.T if t < 1 or t % args.chunk_size]
    if bad:
        p.error(f"--T {bad}: tokens per rank must be positive multiples of --chunk-size {args.chunk_size}")
    if args.op.startswith("loglinear"):
        if args.layer != ["gdn"] or args.transition != ["sequential"]:
            p.error("--op loglinear_gated_delta_rule times that op alone: drop --layer / --transition")
        args.layer = ["loglinear"]
        bad = [t for t in args.T if t & (t - 1)]
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


def _note_failure(notes: list, what: str, err: Exception, device, rank: int) -> None:
    """A case that raised (the same on every rank) becomes a note, printed once; the bench goes on."""
    import torch

    if device.type == "cuda" and isinstance(err, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    notes.append(f"{what} failed: {error_note(err)}")
    if rank == 0:
        print(notes[-1], flush=True)


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
    # a rank that fails alone (e.g. in fla-core's CP) leaves the others in a collective: give up after
    # 5 minutes instead of NCCL's default 10 (both ranks compile and autotune the same kernels at once)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_dt.timedelta(minutes=5),
                            device_id=device if device.type == "cuda" else None)
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


def _peak_mib(fn, device, group, input_mib: float = 0.0) -> float | None:
    """The largest per-rank peak of fn(): its inputs (input_mib) plus what fn allocates above what was
    allocated before it."""
    import torch
    import torch.distributed as dist
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    peak = torch.tensor([(torch.cuda.max_memory_allocated(device) - base) / 2**20 + input_mib], device=device)
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


def _names(layer):
    """The differentiable inputs of a layer, in its call order after q, k, v."""
    return {"gdn": ("g", "beta"), "delta": ("beta",), "gla": ("g",)}.get(layer, ())


def _pair(fwd, x, layer, grad_forward=False):
    """(forward-only, forward+backward) closures of a method returning o; the forward-only one under
    no_grad, or with autograd on (its graph dropped) when grad_forward."""
    import contextlib

    import torch
    inputs = [x[n] for n in ("q", "k", "v") + _names(layer)]

    def fwd_only():
        with contextlib.nullcontext() if grad_forward else torch.no_grad():
            fwd()

    def fwd_bwd():
        torch.autograd.grad(fwd(), inputs, x["do"])
    return fwd_only, fwd_bwd


def _fla_methods(layer, x, group, notes):
    """fla-core's one-device and CP op of a linear layer as closures, or None with a note why not.
    Its guard refusing the gated backward on Hopper with Triton < 3.7.1 (fla #640) is lifted as in
    ``lctrain bench kernels`` (``_load_fla``), and the note says so."""
    try:
        from fla.ops.cp import build_cp_context

        from lctrain.bench.kernels import _load_fla
        chunk_delta_rule, chunk_gated_delta_rule, version = _load_fla(notes)
        if layer == "gla":
            from fla.ops.simple_gla import chunk_simple_gla
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
    fn = {"gdn": chunk_gated_delta_rule, "delta": chunk_delta_rule}.get(layer) or chunk_simple_gla
    notes.append(f"fla-core {version}: {fn.__name__} for {layer}, CP via fla.ops.cp.build_cp_context")
    args = lambda: [x[n] for n in ("q", "k", "v") + _names(layer)]  # noqa: E731
    single = lambda: fn(*args())[0]  # noqa: E731
    cp = lambda: fn(*args(), cp_context=ctx)[0]  # noqa: E731
    return single, cp, version


def _softmax_layer(layer, args, group, rank, T, device):
    """(one device, CP) closures of q, k, v for swa / attn, run as the model's Attention block does
    (lctrain.models.attention): halo exchange for the window, Ulysses for global attention."""
    from lctrain.models.attention import Attention
    window = args.window if layer == "swa" else None
    make = lambda grp: Attention(args.H * args.D, args.H, args.D, window=window, rope=None,
                                 cp_group=grp).to(device)  # noqa: E731
    single, cp = make(None), make(group)
    return single._attend_local, lambda q, k, v: cp._attend_cp(q, k, v, rank * T)


def _linear_rows(layer, args, x, T, P, rank, device, group, kw, notes, first, clock):
    """One result dict per --transition for a linear mixer at T tokens per rank, yielded as soon as
    it is measured (the one-device times, at T and with --strong at P*T, come first)."""

    from lctrain import kernels
    from lctrain.parallel import context_parallel
    from lctrain.parallel.context_parallel import IN_OP_TRANSITIONS, ContextParallelError
    kind = LINEAR[layer]
    op = {"gated_delta": kernels.gated_delta_rule, "delta": kernels.delta_rule, "gla": kernels.gated_linear_attn}[kind]
    tensors = lambda: [x[n] for n in ("q", "k", "v") + _names(layer)]  # noqa: E731
    single = _measure(lambda: op(*tensors(), **kw)[0], x, layer, device, group, args, False)
    clock.progress(f"{layer} T/rank {T}: 1 device at T measured")
    whole = {}
    if args.strong:
        xs = _inputs(args.B, P * T, args.H, args.D, x["q"].dtype, device, seed=7 + P * T)
        whole = _prefixed("whole", _measure(lambda: op(*[xs[n] for n in ("q", "k", "v") + _names(layer)], **kw)[0],
                                            xs, layer, device, group, args, False))
        del xs
        clock.progress(f"{layer} T/rank {T}: 1 device at {P}*T measured")
    fla = _fla_times(layer, args, x, device, group, notes if first else [])
    gates = dict(g=x["g"] if kind != "delta" else None, beta=x["beta"] if kind != "gla" else None)
    for transition in args.transition:
        if clock.out_of_time():
            notes.append(f"--time-limit {args.time_limit:g} s: {layer} [{transition}] at T/rank {T} and later "
                         "cases not measured")
            return
        try:
            cp_op = context_parallel(op, group, transition=transition)
            in_op = cp_op.resolved_transition(kw["backend"], device) in IN_OP_TRANSITIONS
            if in_op and kernels.resolve_backend(
                    kw["backend"], "shard_transition", device) != "triton":
                raise ContextParallelError(f"transition={transition!r} runs inside the Triton kernels (CUDA, or "
                                           "TRITON_INTERPRET=1 with --backend triton)")
        except ContextParallelError as err:  # e.g. "direct" for a delta rule: no such row
            notes.append(f"{layer} [{transition}] not measured: {err}")
            continue
        label = transition if transition != "auto" else f"auto={cp_op.resolved_transition(kw['backend'], device)}"
        res = dict(layer=layer, transition=label, **_prefixed("single", single), **whole)
        try:  # a transition that fails (the same on every rank) loses its own row only
            # the closures below are called within this iteration, so the late binding of cp_op is harmless
            res.update(_prefixed("cp", _measure(lambda: cp_op(*tensors(), **kw)[0],  # noqa: B023
                                                x, layer, device, group, args, True)))
        except Exception as err:  # noqa: BLE001
            _note_failure(notes, f"{layer} [{transition}] at T/rank={T}", err, device, rank)
            continue
        # the passes that CP adds, as this transition runs them on each rank (what each rank computes differs:
        # rank 0 the A-free pass, the last none, ...), the slowest rank's time: what they add to the step
        if in_op:  # no separate passes: inside the op (cp_parts times it)
            res["state_pass_ms"] = res["state_grad_pass_ms"] = None
        else:
            res["state_pass_ms"] = _timed(lambda: cp_op._forward_summary(  # noqa: B023
                x["k"], x["v"], gates["g"], gates["beta"], None, kw["backend"], kw["chunk_size"]),
                device, group, args.warmup, args.iters, True)
            res["state_grad_pass_ms"] = _timed(lambda: cp_op._own_state_grad(  # noqa: B023
                x["q"], x["k"], x["v"], x["do"], gates["g"], gates["beta"], None, kw["backend"], kw["chunk_size"]),
                device, group, args.warmup, args.iters, True)
        res.update(fla)
        yield res


def _loglinear_rows(args, x, T, P, device, group, kw):
    """The log-linear Gated DeltaNet (its own CP op: lctrain.parallel.loglinear_cp); level weights for
    the whole CP sequence, the 1-device run uses its first levels."""
    import torch

    from lctrain import kernels
    from lctrain.parallel import context_parallel
    op = kernels.loglinear_gated_delta_rule
    cp_op = context_parallel(op, group)
    lam = torch.nn.functional.softplus(torch.randn(args.B, T, args.H, kernels.levels_needed(P * T), device=device))
    lam.requires_grad_(True)
    args5 = lambda: (x["q"], x["k"], x["v"], x["g"], x["beta"], lam)  # noqa: E731
    res = dict(layer="loglinear", transition="levels")
    res.update(_prefixed("single", _measure(lambda: op(*args5(), **kw)[0], x, "gdn", device, group, args, False)))
    res.update(_prefixed("cp", _measure(lambda: cp_op(*args5(), **kw)[0], x, "gdn", device, group, args, True)))
    # the separate state pass, where the CP op runs one (the level scans' path); the transition tree's ranks exchange
    # inside their call instead (every rank decides alike: the same shapes and settings)
    if cp_op.exchanges_in_call(x["q"], x["v"], x["beta"], kw["backend"], kw["chunk_size"]):
        res["state_pass_ms"] = None
    else:
        trans = lambda: kernels.shard_transition("gated_delta", x["k"], x["v"], g=x["g"], beta=x["beta"],
                                                 **kw)  # noqa: E731
        res["state_pass_ms"] = _timed(trans, device, group, args.warmup, args.iters, False)
    return [res]


def _softmax_rows(layer, args, x, T, P, rank, device, group, notes, clock):
    """The row of swa / attn at T tokens per rank: one device at T, CP at P*T and one device at P*T (always:
    the targets compare CP with one device holding the whole sequence, in time and in peak memory).

    Each stage's first call runs alone, between progress lines, before its timing: on CUDA the sliding
    window compiles FlexAttention there (one graph per geometry: T x T, the halo's T x (T + W - 1), then
    the whole length; later lengths reuse the dynamic-shape graphs), which takes most of the first case's
    time. The forward is timed with autograd on (as in a training step, the same compiled graph as the
    forward+backward; no_grad would compile a second graph per geometry). --time-limit is checked between
    the stages (on every rank alike), so a case stops after the stage that ran over."""
    single_fn, cp_fn = _softmax_layer(layer, args, group, rank, T, device)
    res = dict(layer=layer, transition="halo" if layer == "swa" else "ulysses")
    xs = None
    stages = [("single", "1 device at T", lambda: single_fn(x["q"], x["k"], x["v"]), False),
              ("cp", f"CP={P} at {P}*T", lambda: cp_fn(x["q"], x["k"], x["v"]), True),
              ("whole", f"1 device at {P}*T", lambda: single_fn(xs["q"], xs["k"], xs["v"]), False)]
    for i, (prefix, what, fwd, slowest) in enumerate(stages):
        if i and clock.out_of_time():
            notes.append(f"--time-limit {args.time_limit:g} s: {layer} at T/rank {T}: {what} and later stages "
                         "not measured")
            break
        if prefix == "whole":
            xs = _inputs(args.B, P * T, args.H, args.D, x["q"].dtype, device, seed=7 + P * T)
        inputs = xs if prefix == "whole" else x
        why = (", FlexAttention compiles for a new shape" if layer == "swa" and device.type == "cuda"
               else ", DeepSpeed Ulysses set-up" if prefix == "cp" and layer == "attn" else "")
        clock.progress(f"{layer} T/rank {T}: {what}: first call (untimed{why}) ...")
        t0 = time.perf_counter()
        _pair(fwd, inputs, layer, grad_forward=True)[1]()
        _sync(device)
        clock.progress(f"{layer} T/rank {T}: {what}: first call took {time.perf_counter() - t0:.1f} s; timing ...")
        res.update(_prefixed(prefix, _measure(fwd, inputs, layer, device, group, args, slowest, grad_forward=True)))
        clock.progress(f"{layer} T/rank {T}: {what} measured")
    xs = None  # noqa: F841 - frees the whole-length inputs (the closure above holds the name)
    if "cp_fwd_bwd_ms" not in res:
        return []
    return [res]


def _measure(fwd, x, layer, device, group, args, slowest, grad_forward=False) -> dict:
    f_only, f_bwd = _pair(fwd, x, layer, grad_forward)
    return {"fwd_ms": _timed(f_only, device, group, args.warmup, args.iters, slowest),
            "fwd_bwd_ms": _timed(f_bwd, device, group, args.warmup, args.iters, slowest),
            "peak_mib": _peak_mib(f_bwd, device, group, _input_mib(x, layer))}


def _input_mib(x, layer) -> float:
    """MiB of the layer's own inputs (q, k, v, its gates, do): part of a device's peak, but allocated
    before the measured call (and other stages' inputs may sit beside them)."""
    return sum(x[n].numel() * x[n].element_size() for n in ("q", "k", "v", "do") + _names(layer)) / 2**20


def _prefixed(prefix, d):
    return {f"{prefix}_{k}": v for k, v in d.items()}


def _fla_times(layer, args, x, device, group, notes) -> dict:
    res = {"fla_single_fwd_bwd_ms": None, "fla_cp_fwd_bwd_ms": None, "fla_efficiency": None}
    if not args.fla or device.type != "cuda":
        notes.append("fla-core CP not timed: " + ("it needs CUDA" if args.fla else
                                                  "pass --fla (in its own invocation: its autotuning takes minutes)"))
        return res
    fla = _fla_methods(layer, x, group, notes)
    if fla is None:
        return res
    try:
        res["fla_single_fwd_bwd_ms"] = _timed(_pair(fla[0], x, layer)[1], device, group, args.warmup, args.iters, False)
        res["fla_cp_fwd_bwd_ms"] = _timed(_pair(fla[1], x, layer)[1], device, group, args.warmup, args.iters, True)
        res["fla_efficiency"] = res["fla_single_fwd_bwd_ms"] / res["fla_cp_fwd_bwd_ms"]
    except Exception as err:  # noqa: BLE001 - report, keep our own figures
        notes.append(f"fla-core {layer} at T/rank={x['q'].shape[1]} failed: {error_note(err)}")
    res["fla_version"] = fla[2]
    return res


class _Results:
    """The rows measured so far (rank 0): each is printed when measured and the JSON (--json) is
    rewritten after every row, marked partial (lctrain.bench.report.write_partial), so a run cut short
    still leaves what it measured."""

    def __init__(self, args, argv, P, device, notes, rank):
        self.args, self.argv, self.P, self.device, self.notes, self.rank = args, argv, P, device, notes, rank
        self.rows, self.raw, self.fla_version = [], [], None
        # the cases (layer, T, transition) asked for: one row each when all goes well
        self.total = len(args.T) * sum(len(args.transition) if layer in LINEAR else 1 for layer in args.layer)

    def add(self, res: dict) -> None:
        T, P = res["T_per_rank"], self.P
        res["T_total"] = P * T
        res["efficiency"] = res["single_fwd_bwd_ms"] / res["cp_fwd_bwd_ms"]
        whole = res.get("whole_fwd_bwd_ms")
        res["cp_over_whole"] = None if whole is None else res["cp_fwd_bwd_ms"] / whole
        wp = res.get("whole_peak_mib")
        res["cp_peak_over_whole"] = None if not wp or res["cp_peak_mib"] is None else res["cp_peak_mib"] / wp
        self.fla_version = res.pop("fla_version", None) or self.fla_version
        self.raw.append(res)
        self.rows.append([res["layer"], res["transition"], T, P * T] + [_round(res.get(k)) for k in (
            "single_fwd_ms", "single_fwd_bwd_ms", "cp_fwd_ms", "cp_fwd_bwd_ms", "efficiency",
            "state_pass_ms", "state_grad_pass_ms", "single_peak_mib", "cp_peak_mib",
            "fla_single_fwd_bwd_ms", "fla_cp_fwd_bwd_ms", "fla_efficiency", "whole_fwd_bwd_ms",
            "whole_peak_mib", "cp_over_whole", "cp_peak_over_whole")])
        if self.rank != 0:
            return
        grad = res.get("state_grad_pass_ms")
        print(f"{res['layer']} [{res['transition']}] T/rank {T}: 1-dev {res['single_fwd_bwd_ms']:.3f} ms, "
              f"CP={P} {res['cp_fwd_bwd_ms']:.3f} ms, efficiency {res['efficiency']:.3f}"
              + (f", state pass {res['state_pass_ms']:.3f} ms" if res.get("state_pass_ms") is not None else "")
              + (f", state-grad pass {grad:.3f} ms" if grad is not None else "")
              + (f", peak CP/1-dev {res['cp_peak_mib'] / res['single_peak_mib']:.2f}"
                 if res.get("cp_peak_mib") and res.get("single_peak_mib") else "")
              + (f", CP / 1-dev at {P}*T {res['cp_over_whole']:.3f}" if res["cp_over_whole"] else "")
              + (f", CP peak / 1-dev at {P}*T {res['cp_peak_over_whole']:.3f}" if res["cp_peak_over_whole"] else ""),
              flush=True)
        write_partial(self.result(), self.args.json, len(self.rows), self.total)

    def result(self) -> dict:
        import torch

        args = self.args
        return result_dict(
            f"Context-parallel {', '.join(TITLES[layer] for layer in args.layer)}, weak scaling, CP={self.P}",
            "lctrain bench cp " + " ".join(self.argv), _cp_device(self.P, self.device),
            {"torch": torch.__version__, "triton": _version("triton"), "fla-core": self.fla_version},
            list(dict.fromkeys(self.notes)), COLUMNS, self.rows, self.raw,
            date=_dt.datetime.now().isoformat(timespec="seconds"))


def _worker(args, argv) -> int:
    import torch
    import torch.distributed as dist

    device, group, P, rank = init_worker(args.device)
    _allow_recompiles()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    kw = dict(backend=args.backend, chunk_size=args.chunk_size)
    notes = [f"B={args.B}, H={args.H}, head dim {args.D}, {args.dtype}, backend {args.backend}, chunk "
             f"{args.chunk_size}, "
             f"{args.warmup} warm-up + {args.iters} timed iterations; efficiency = 1-device fwd+bwd at T / CP fwd+bwd "
             f"at {P}*T; '1-dev at T total' = one device at {P}*T (strong scaling, --strong, always for swa and attn); "
             f"swa window {args.window}; swa / attn forward timed with autograd on; peak MiB = the layer's inputs "
             "(q, k, v, gates, do) + the most one forward+backward allocates; the state pass and state-grad pass "
             "columns time the passes CP adds as the row's "
             "transition runs them on each rank (rank 0 the A-free pass, the last rank no forward pass, rank 0 no "
             "state-gradient pass, middle ranks (A, B) and G; sequential_all: every pass on every rank), alone, the "
             "slowest rank's time"]
    clock = Clock(args.time_limit, "bench cp", rank=rank, group=group, device=device)
    results = _Results(args, argv, P, device, notes, rank)
    cases = [(layer, T) for layer in args.layer for T in args.T]
    try:
        for i, (layer, T) in enumerate(cases):
            if clock.out_of_time():
                notes.append(f"--time-limit {args.time_limit:g} s reached: {layer} at T/rank {T} and later cases not "
                             "measured")
                break
            clock.progress(f"case {i + 1}/{len(cases)}: {layer} at T/rank {T} (CP={P}, T total {P * T})")
            x = _inputs(args.B, T, args.H, args.D, dtype, device, seed=1000 * rank + T)
            try:
                if layer == "loglinear":
                    rows = _loglinear_rows(args, x, T, P, device, group, kw)
                elif layer in LINEAR:
                    rows = _linear_rows(layer, args, x, T, P, rank, device, group, kw, notes,
                                        T == args.T[0], clock)
                else:
                    rows = _softmax_rows(layer, args, x, T, P, rank, device, group, notes, clock)
                for res in rows:
                    res["T_per_rank"] = T
                    results.add(res)
            except Exception as err:  # noqa: BLE001 - e.g. DeepSpeed missing for Ulysses: say so, go on
                _note_failure(notes, f"{layer} at T/rank={T}", err, device, rank)
                continue
            finally:
                del x
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        clock.progress("done")
        # every rank done before any tears gloo down: a rank destroying its group while the other still
        # finished its last collective aborted that rank once in CI ("terminate called without an active
        # exception", after the results were printed)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    publish(results.result(), args.json, args.record)
    return 0


def _allow_recompiles(limit: int = 64) -> None:
    """FlexAttention (swa on CUDA) compiles once per geometry and grad mode; over Dynamo's default limit of
    8 graphs it would fall back to the unfused path that materialises the T x T scores (minutes, or out
    of memory, at these lengths). The bench raises the limit, and makes a hit an error (the case fails
    with a note) instead of that silent fallback."""
    import torch._dynamo.config as dynamo_config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        dynamo_config.fail_on_recompile_limit_hit = True


def _cp_device(P: int, device) -> str:
    """The device text of a CP result: the rank count times the GPU name (gloo on CPU)."""
    import torch
    return f"{P} x " + (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)")


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
