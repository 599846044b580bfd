"""`python -m lctrain.bench.loglinear_memory`: the GPU memory of one forward+backward of the log-linear
ops (backend "triton"), predicted on the CPU by running the code itself.

The op runs on meta tensors (shapes and dtypes, no data) with every Triton launch skipped, under a
dispatch mode that sees every storage torch allocates and notices when it dies (``LiveBytes``). So the
Python that decides the buffers (kernels/loglinear/fused.py, triton_levels.py, triton_intra.py, the WY
stage in kernels/triton/wy.py, autograd's own gradient casts) is the code that is measured: the
prediction cannot drift from it. What it reports is what ``lctrain bench loglinear`` reports as "peak
MiB": the highest sum of live storages allocated during one fwd+bwd, inputs and dO excluded, the returned
gradients included (``torch.cuda.max_memory_allocated`` after a call, less what was allocated before it),
with the bench's inputs (q, k, v, level weights, dO in the dtype; g float32; beta in the dtype). The CUDA
caching allocator rounds each block up to 512 bytes: nothing at these sizes.

    python -m lctrain.bench.loglinear_memory --T 65536 524288 1048576          # H=16, D=128, bf16
    python -m lctrain.bench.loglinear_memory --T 512 --H 2 --D 16 --dtype fp16 --check

``--torch-ops`` also lists the torch operations of that fwd+bwd (every op that is not a view or an allocation:
casts, adds, fills, matmuls around the Triton kernels) with the bytes each reads and writes, largest first
(``torch_op_bytes``): on a GPU such ops are bound by memory, so their bytes over its bandwidth bound their time.

``--check`` also runs the same call for real on the CPU (Triton interpreter: small shapes only, seconds
at T=512, D=16) under the same tracker and compares the two peaks (tests/test_loglinear_memory.py does it
too). Without a GPU nothing here is a GPU measurement; ``lctrain bench loglinear --T ... --methods ll_gdn``
is (docs/loglinear.md, "Memory").
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field

_HERE = os.path.abspath(__file__)


@dataclass
class Alloc:
    nbytes: int
    shape: tuple
    dtype: str
    site: str      # "kernels/loglinear/triton_levels.py:431 hs = torch.empty(...)" (innermost repo frame)


@dataclass
class Trace:
    peak: int = 0
    at_peak: list = field(default_factory=list)   # [Alloc] live at the peak
    final: int = 0                                # live bytes left at the end (the returned gradients)
    count: int = 0                                # allocations seen
    timeline: list = field(default_factory=list)  # (live bytes after it, Alloc) of every non-empty allocation


def _roots() -> list:
    """The folders holding lctrain/ and kernels/ (one checkout, or the worktree and an editable install)."""
    import lctrain
    import lctrain.kernels
    return sorted({os.path.dirname(os.path.dirname(os.path.abspath(m.__file__))) for m in (lctrain, lctrain.kernels)})


_PACKAGES = ("lctrain", "kernels", "parallel")  # the folders of lctrain's code in a checkout


def _site(roots) -> str:
    """The innermost frame of lctrain's code (not this file, not a test) that led to the allocation."""
    import linecache
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        path = os.path.abspath(name)
        root = next((r for r in roots if path.startswith(r + os.sep)), None)
        # only the repository's packages: a virtual environment may live inside the checkout (CI's .venv)
        rel = os.path.relpath(path, root) if root else ""
        if rel.split(os.sep)[0] in _PACKAGES and not name.startswith("<") and path != _HERE:
            return f"{rel}:{f.f_lineno} {linecache.getline(path, f.f_lineno).strip()}"
        f = f.f_back
    return "(autograd, outside lctrain's code)"


class LiveBytes:
    """Context manager: the peak of the summed sizes of the storages allocated inside it and still alive
    (views and in-place results add nothing; a storage counts from the op that made it until it is freed).
    Frees are noticed at the next op, which is where the next allocation can happen: so the peak is exact
    for the eager code. ``trace`` holds the result."""

    def __init__(self):
        self.trace = Trace()

    def __enter__(self):
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode

        live: dict = {}
        trace = self.trace
        roots = _roots()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for key in [k for k, (ref, _) in live.items() if ref.expired()]:
                    del live[key]
                rets = func._schema.returns
                outs = out if isinstance(out, (tuple, list)) else (out,)
                new = []
                for i, t in enumerate(outs):
                    if not isinstance(t, torch.Tensor) or (i < len(rets) and rets[i].alias_info is not None):
                        continue
                    ref = StorageWeakRef(t.untyped_storage())
                    if ref.cdata in live:
                        continue
                    alloc = Alloc(t.untyped_storage().nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""),
                                  _site(roots))
                    live[ref.cdata] = (ref, alloc)
                    trace.count += 1
                    new.append(alloc)
                total = sum(a.nbytes for _, a in live.values())
                trace.timeline += [(total, a) for a in new if a.nbytes]
                if total > trace.peak:
                    trace.peak = total
                    trace.at_peak = [a for _, a in live.values()]
                return out

        self._live = live
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self.trace.final = sum(a.nbytes for ref, a in self._live.values() if not ref.expired())
        return False


@dataclass
class OpBytes:
    op: str        # "aten.add_.Tensor"
    nbytes: int    # bytes of its tensor arguments and results (what it reads and writes, views at their size)
    site: str


class TorchOpBytes:
    """Context manager: every torch operation inside it that moves data (not a view, not an allocation) with the
    bytes of its tensor arguments and results (``ops``, in order). Under ``kernel_launches_skipped`` on meta
    tensors that is exactly the eager torch code around the Triton kernels."""

    _VIEWS = ("view", "expand", "slice", "select", "as_strided", "t.default", "transpose", "permute", "unsqueeze",
              "squeeze", "detach", "alias", "split", "unbind", "chunk", "narrow", "unflatten", "reshape", "empty")

    def __init__(self):
        self.ops: list = []

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        ops, roots, views = self.ops, _roots(), self._VIEWS

        def size(x):
            return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = str(func)
                if not any(v in name for v in views):
                    flat = [t for a in (*args, *(kwargs or {}).values()) for t in (a if isinstance(a, (list, tuple))
                                                                                     else (a,))]
                    outs = out if isinstance(out, (list, tuple)) else (out,)
                    ops.append(OpBytes(name, sum(map(size, flat)) + sum(map(size, outs)), _site(roots)))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


def torch_op_bytes(kind: str, B: int, T: int, H: int, D: int, dtype) -> list:
    """[OpBytes] of the torch operations of one fwd+bwd of the bench's call on meta tensors (Triton launches
    skipped), after a first call that fills the caches as the bench's warm-up does."""
    import torch
    x = bench_inputs(kind, B, T, H, D, dtype, "meta")
    fwd, leaves = _call(kind, x)
    with kernel_launches_skipped(), _interpreting_env():
        torch.autograd.grad(fwd(), leaves, x["do"])
        with TorchOpBytes() as seen:
            torch.autograd.grad(fwd(), leaves, x["do"])
    return seen.ops


@contextlib.contextmanager
def _kernel_launches(replace):
    """Every ``kernel[grid](...)`` of a Triton kernel (compiled or interpreted, with or without heuristics)
    calls ``replace(launch, args, kwargs)`` instead, ``launch`` being the original launcher."""
    from triton.runtime import jit

    classes = [jit.KernelInterface]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - other Triton layouts
        pass
    def patched(orig):
        def getitem(self, grid):
            launch = orig(self, grid)
            return lambda *args, **kwargs: replace(launch, args, kwargs)
        return getitem

    saved = {cls: cls.__dict__.get("__getitem__") for cls in classes}
    for cls in classes:
        cls.__getitem__ = patched(cls.__getitem__)
    try:
        yield
    finally:
        for cls, fn in saved.items():
            if fn is None:
                del cls.__getitem__
            else:
                cls.__getitem__ = fn


def kernel_launches_skipped():
    """Launches do nothing: for running the Python around the kernels on meta tensors."""
    return _kernel_launches(lambda launch, args, kwargs: None)


def kernel_launches_collected():
    """Launches run, then the garbage collector: the Triton interpreter copies a kernel's arguments back
    through a recursive closure (``GridExecutor._restore_args_dev``), a reference cycle that keeps the
    last launch's tensors alive until the next collection. Compiled launches hold nothing; for the CPU
    check to see the lifetimes the GPU sees, collect after every interpreted launch."""
    import gc

    def run(launch, args, kwargs):
        out = launch(*args, **kwargs)
        gc.collect()
        return out
    return _kernel_launches(run)


def bench_inputs(kind: str, B: int, T: int, H: int, D: int, dtype, device, seed: int = 0) -> dict:
    """The inputs of ``lctrain bench loglinear`` (same shapes and dtypes; random on a real device, empty on
    meta): gdn takes q, k, v, g, beta, lam; mamba2 one q/k shared by the heads (expanded: the op copies
    them) as the bench's ll_mamba2 row."""
    import torch
    import torch.nn.functional as F

    from lctrain.kernels import levels_needed
    L = levels_needed(T)
    if torch.device(device).type == "meta":
        def mk(*s, dt=torch.float32):
            return torch.empty(*s, device=device, dtype=dt)
        x = dict(q=mk(B, T, H, D, dt=dtype), k=mk(B, T, H, D, dt=dtype), v=mk(B, T, H, D, dt=dtype),
                 g=mk(B, T, H), beta=mk(B, T, H, dt=dtype), lam=mk(B, T, H, L, dt=dtype),
                 q1=mk(B, T, 1, D, dt=dtype), k1=mk(B, T, 1, D, dt=dtype), do=mk(B, T, H, D, dt=dtype))
    else:
        gen = torch.Generator(device=device).manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
        x = dict(q=r(B, T, H, D).to(dtype), k=F.normalize(r(B, T, H, D), dim=-1).to(dtype),
                 v=r(B, T, H, D).to(dtype), g=F.logsigmoid(r(B, T, H) + 3.0), beta=torch.sigmoid(r(B, T, H)).to(dtype),
                 lam=F.softplus(r(B, T, H, L)).to(dtype), q1=(r(B, T, 1, D) * D ** -0.5).to(dtype),
                 k1=(r(B, T, 1, D) * D ** -0.5).to(dtype), do=r(B, T, H, D).to(dtype))
    for n, t in x.items():
        if n != "do":
            t.requires_grad_(True)
    return x


def _call(kind: str, x: dict):
    """(forward returning o, the differentiable inputs): the bench's ll_gdn / ll_mamba2."""
    from lctrain.kernels import loglinear_gated_delta_rule, loglinear_gated_linear_attn
    if kind == "gdn":
        return (lambda: loglinear_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], x["lam"],
                                                   backend="triton")[0],
                [x["q"], x["k"], x["v"], x["g"], x["beta"], x["lam"]])
    H = x["v"].shape[2]
    shared = lambda t: t.expand(-1, -1, H, -1)  # noqa: E731
    return (lambda: loglinear_gated_linear_attn(shared(x["q1"]), shared(x["k1"]), x["v"], x["g"], x["lam"],
                                                scale=1.0, backend="triton")[0],
            [x["q1"], x["k1"], x["v"], x["g"], x["lam"]])


def input_bytes(x: dict) -> int:
    return sum(t.untyped_storage().nbytes() for t in x.values())


def fwd_bwd_trace(kind: str, B: int, T: int, H: int, D: int, dtype, device="meta", x: dict | None = None,
                  warmup: bool = True) -> Trace:
    """The allocation trace of one fwd+bwd (``torch.autograd.grad(o, inputs, dO)``, as the bench measures
    it). On meta every Triton launch is skipped; elsewhere the kernels run (CPU: the Triton interpreter).
    With ``warmup`` a first call outside the tracker fills the caches the bench's warm-up call fills (the
    level scans' work lists, kept per device and shape): without, they count as allocations."""
    import torch
    if x is None:
        x = bench_inputs(kind, B, T, H, D, dtype, device)
    meta = torch.device(device).type == "meta"
    skip = kernel_launches_skipped() if meta else kernel_launches_collected()
    interp = _interpreting_env() if meta else contextlib.nullcontext()
    fwd, leaves = _call(kind, x)
    with skip, interp:
        if warmup:
            torch.autograd.grad(fwd(), leaves, x["do"])   # the bench's compile call
        with LiveBytes() as tracker:
            grads = torch.autograd.grad(fwd(), leaves, x["do"])
            del grads
    return tracker.trace


@contextlib.contextmanager
def _interpreting_env():
    """backend="triton" accepts non-CUDA tensors only under TRITON_INTERPRET=1 (kernels/api.py); on meta
    nothing is launched, so say so for the duration."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def by_site(allocs: list) -> list:
    """[(site, shape, dtype, count, bytes)] of the live allocations, largest first (same site and shape
    summed: the per-group h buffers, ...)."""
    rows: dict = {}
    for a in allocs:
        key = (a.site, a.shape, a.dtype)
        n, b = rows.get(key, (0, 0))
        rows[key] = (n + 1, b + a.nbytes)
    return sorted(((s, sh, dt, n, b) for (s, sh, dt), (n, b) in rows.items()), key=lambda r: -r[4])


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m lctrain.bench.loglinear_memory",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[16384, 65536, 524288, 1048576])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128, help="head dim of q/k and v (default 128)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--kind", choices=["gdn", "mamba2"], default="gdn",
                   help="gdn: the bench's ll_gdn; mamba2: its ll_mamba2 (shared q/k)")
    p.add_argument("--levels-cfg", default="", metavar="KEY=INT[,KEY=INT]",
                   help="launch settings of the level kernels (triton_levels.CONFIG) for the prediction")
    p.add_argument("--top", type=int, default=12, help="allocation sites listed at the peak")
    p.add_argument("--torch-ops", action="store_true",
                   help="also list the torch operations around the kernels with the bytes each moves")
    p.add_argument("--check", action="store_true",
                   help="also run the call for real on the CPU (Triton interpreter; small T only) and compare")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.check:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported
    import torch

    from lctrain.kernels.loglinear import triton_levels
    dtype = getattr(torch, _DTYPES[args.dtype])
    old = None
    if args.levels_cfg:
        old = triton_levels.set_levels_config(**triton_levels.parse_levels_config(args.levels_cfg))
    try:
        for T in args.T:
            trace = fwd_bwd_trace(args.kind, args.B, T, args.H, args.D, dtype)
            x = bench_inputs(args.kind, args.B, T, args.H, args.D, dtype, "meta")
            tok = args.B * T
            print(f"\nll_{args.kind} T={T} B={args.B} H={args.H} D={args.D} {args.dtype}: predicted peak "
                  f"{trace.peak / 2**20:.1f} MiB = {trace.peak / 2**30:.2f} GiB ({trace.peak / tok / 1024:.2f} KiB "
                  f"per token); the bench's inputs {input_bytes(x) / 2**30:.2f} GiB more on the device")
            print(f"  live at the peak ({len(trace.at_peak)} tensors), by allocation site:")
            for site, shape, dt, n, b in by_site(trace.at_peak)[: args.top]:
                print(f"  {b / tok / 1024:9.2f} KiB/token {b / 2**20:11.1f} MiB  {n} x {list(shape)} {dt}  {site}")
            if args.torch_ops:
                ops = torch_op_bytes(args.kind, args.B, T, args.H, args.D, dtype)
                print(f"  torch operations: {len(ops)}, moving {sum(o.nbytes for o in ops) / 1e9:.2f} GB; the largest:")
                for o in sorted(ops, key=lambda o: -o.nbytes)[: args.top]:
                    print(f"  {o.nbytes / 1e6:10.1f} MB  {o.op:32s} {o.site}")
            if args.check:
                real = fwd_bwd_trace(args.kind, args.B, T, args.H, args.D, dtype, device="cpu")
                same = "equal" if real.peak == trace.peak else f"DIFFERENT by {real.peak - trace.peak} bytes"
                print(f"  CPU run (Triton interpreter): peak {real.peak} bytes, predicted {trace.peak}: {same}")
    finally:
        if old is not None:
            triton_levels.set_levels_config(**old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
