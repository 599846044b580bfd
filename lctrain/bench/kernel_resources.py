"""Developer tool: registers, spills and shared memory of our Triton kernels on Hopper, without a GPU.

    python -m lctrain.bench.kernel_resources [--D 128] [--cfg KEY=INT[,KEY=INT]] [--target 90] [--varlen]
    python -m lctrain.bench.kernel_resources --op deltaformer [--D 128]
    python -m lctrain.bench.kernel_resources --op loglinear [--D 128] [--cfg LP=2,BV=32]

Runs one forward and backward of each mixer through ``lctrain.kernels.triton.ops`` on meta tensors
with every kernel launch intercepted, so exactly the launches ops makes (same constexprs, warps and
stages, under the current launch settings) are compiled for sm_<target> by Triton and read back
with the ``cuobjdump`` that ships with Triton. A STACK above 0 means the kernel spills registers to
local memory: on Hopper that was the main cause of slow kernels here (see docs/kernels-notes.md).
Use the Triton version of the GPU machines (3.6) for numbers that match them.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

_SIG = {"torch.bfloat16": "*bf16", "torch.float16": "*fp16", "torch.float32": "*fp32", "torch.int32": "*i32",
        "torch.int64": "*i64"}  # int: the varlen boundaries and chunk map


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kw)` records the call as the @triton.jit
    function with every argument bound, its @triton.heuristics flags applied as their run would."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kw):
        from triton.runtime.autotuner import Heuristics
        fn = self.kernel
        while isinstance(fn, Heuristics):
            for flag, rule in fn.values.items():
                kw[flag] = rule({**dict(zip(fn.arg_names, args)), **kw})
            fn = fn.fn
        self.calls.append((fn, args, kw))


def record_launches(D: int, dtype_name: str, varlen: bool = False, T: int = 4096) -> list:
    """(jit function, args, kwargs) of every launch of one fwd+bwd of each mixer (B=1, T tokens, 16 heads), on
    meta tensors; ``varlen``: of packed documents (cu_seqlens: 4 documents, 80 chunks), the varlen kernels."""
    import torch

    from lctrain.kernels.triton import dqdk, ops, output, state, wy
    dtype = getattr(torch, dtype_name)
    calls: list = []
    saved = {(mod, n): getattr(mod, n) for mod in (wy, state, output, dqdk) for n in dir(mod)
             if n.endswith("_kernel")}
    try:
        for (mod, n), kernel in saved.items():
            setattr(mod, n, _Recorder(kernel, calls))
        # T and the chunk count divisible by 16, as in real runs: Triton specialises on that, and the
        # software pipeliner (so shared memory) differs otherwise
        B, H = 1, 16
        m = dict(device="meta")
        q, k, v, do = (torch.empty(B, T, H, D, dtype=dtype, **m) for _ in range(4))
        g = torch.empty(B, T, H, dtype=torch.float32, **m)
        beta = torch.empty(B, T, H, dtype=torch.float32, **m)
        vl, s0 = None, None
        if varlen:
            from lctrain.kernels.triton.common import Varlen
            i32 = dict(dtype=torch.int32, **m)
            vl = Varlen(torch.empty(5, **i32), torch.empty(80, 2, **i32), torch.empty(4, 2, **i32),
                        torch.empty(T, dtype=torch.int64, **m), 80, 4)
            s0 = torch.empty(4, H, D, D, dtype=torch.float32, **m)
        for gate, b in ((None, beta), (g, beta), (g, None)):
            vkw = {} if vl is None else {"varlen": vl}
            _, _, gam, tm = ops._forward(q, k, v, gate, b, s0, 1.0, False, **vkw)
            ops._backward(q, k, v, gate, b, s0, 1.0, do, None, gam, tm, **vkw)
    finally:
        for (mod, n), kernel in saved.items():
            setattr(mod, n, kernel)
    return calls


def record_deltaformer_launches(D: int, tf32: bool = True, half=None) -> list:
    """(jit function, args, kwargs) of every Triton launch of one Deltaformer u-pass fwd+bwd (chunk
    256 of a 4096-token sequence, 16 heads) and of the three context-parallel blocks, on meta tensors.
    ``tf32``: the launches of ``kernel_dots="tf32"`` (TF32 dots); False: of float32
    inputs (full-precision dots, which spill at head dim 128: slower, for accuracy only). ``half``
    (torch.bfloat16 / float16): the launches of ``kernel_dots="half"`` (dot operands in that type; what
    ``"auto"``, the default, runs for bf16 / fp16 inputs and so what training runs)."""
    import torch

    from lctrain.kernels.deltaformer import chunk, triton_bwd, triton_fwd
    calls: list = []
    mods = (triton_fwd, triton_bwd)
    saved = {(mod, n): getattr(mod, n) for mod in mods for n in dir(mod) if n.endswith("_kernel")}
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    dots = chunk.half_dots(half)
    dots.__enter__()
    try:
        for (mod, n), kernel in saved.items():
            setattr(mod, n, _Recorder(kernel, calls))
        B, T, H, L, G = 1, 4096, 16, 2048, 1024
        e = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
        st = triton_fwd.triton_stages()
        k, v, beta = e(B, H, T, D), e(B, H, T, D), e(B, H, T)
        if half is not None:                    # kernel_dots="half" keeps k (and copies of u) in it
            k = k.to(half)
        u, lse, w = chunk.chunk_forward(k, v, beta, D ** -0.5, 256, st.stats, stats_u_dtype=half, solve=st.solve)
        chunk.chunk_backward(k, beta, u, lse, w, e(B, H, T, D), D ** -0.5, 256, st, half_copies=half)
        if half is not None:                    # context parallelism has no kernel_dots
            return calls
        kl, ul, dk, rhs = e(B, H, L, D), e(B, H, L, D), e(B, H, L, D), e(B, H, L, D)
        st.block_partials(kl, e(B, H, G, D), e(B, H, G, D), 0.1)
        st.pull(e(B, H, G, D), e(B, H, G), e(B, H, G, D), e(B, H, G), kl, ul, rhs, dk, 0.1)
        st.rows_vs_keys(kl, e(B, H, L), e(B, H, L, D), e(B, H, L), e(B, H, G, D), e(B, H, G, D), dk, 0.1)
    finally:
        dots.__exit__(None, None, None)
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
        for (mod, n), kernel in saved.items():
            setattr(mod, n, kernel)
    return calls


def record_loglinear_launches(D: int, dtype_name: str) -> list:
    """(jit function, args, kwargs) of every Triton launch of one fwd+bwd of the fused log-linear ops
    (backend "triton": Gated DeltaNet and Mamba-2, and Gated DeltaNet by the transition tree, from position 0 and
    as a CP rank's shard with an incoming level state) on a 4096-token sequence of 16 heads, on meta tensors."""
    import torch

    from lctrain.kernels.loglinear import fused, triton_intra, triton_levels, triton_tree
    from lctrain.kernels.triton import wy
    dtype = getattr(torch, dtype_name)
    calls: list = []
    mods = (triton_levels, triton_intra, triton_tree, wy)
    saved = {(mod, n): getattr(mod, n) for mod in mods for n in dir(mod) if n.endswith("_kernel")}
    try:
        for (mod, n), kernel in saved.items():
            setattr(mod, n, _Recorder(kernel, calls))
        B, T, H, c = 1, 4096, 16, 6
        m = dict(device="meta")
        q, k, v, do = (torch.empty(B, T, H, D, dtype=dtype, **m) for _ in range(4))
        g, beta = (torch.empty(B, T, H, dtype=torch.float32, **m) for _ in range(2))
        lam = torch.empty(B, T, H, 13, dtype=torch.float32, **m)
        # the tree from an incoming state: 4096 tokens from 4096 (chunk 64), the level of 128 chunks continuing
        lam_in = torch.empty(B, T, H, 14, dtype=torch.float32, **m)
        s0 = torch.empty(B, H, 14 - c - 1, D, D, dtype=torch.float32, **m)
        for b, tree, n0 in ((beta, False, 0), (None, False, 0), (beta, True, 0), (beta, True, T // 64)):
            ctx = type("Ctx", (), {"save_for_backward": lambda self, *t: setattr(self, "saved_tensors", t),
                                   "set_materialize_grads": lambda self, value: None})()
            args = (lam, None, D ** -0.5, n0, c, 13 - c - 1) if not n0 else (lam_in, s0, D ** -0.5, n0, c, 14 - c - 1)
            fused._FusedLogLinear.forward(ctx, q, k, v, g, b, *args, False, True, tree)
            fused._FusedLogLinear.backward(ctx, do, None)
    finally:
        for (mod, n), kernel in saved.items():
            setattr(mod, n, kernel)
    return calls


def _signature(fn, args, kw):
    """Triton's signature, constexprs and attributes for one launch, as the JIT would specialise it:
    pointers (16-byte aligned allocations) and ints divisible by 16 are marked so, and an absent
    (None) argument is a constexpr. Without that attribute Triton cannot use async copies, so it
    does not software-pipeline the loads, and the shared memory, registers and spills it reports
    are not those of the real launch."""
    import inspect

    import torch
    params = list(inspect.signature(fn.fn).parameters)
    plain = set(getattr(fn, "do_not_specialize", None) or ())   # @triton.jit(do_not_specialize=[...])
    sig, consts, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for i, (name, val) in enumerate(zip(params, args)):
        if isinstance(val, torch.Tensor):
            sig[name] = _SIG[str(val.dtype)]
            attrs[(i,)] = divisible
        elif val is None:
            sig[name] = "constexpr"
            consts[name] = None
        elif isinstance(val, float):
            sig[name] = "fp32"
        elif val == 1 and name not in plain and i not in plain:   # the JIT compiles an int 1 as the constant
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if val % 16 == 0 and name not in plain and i not in plain:
                attrs[(i,)] = divisible
    for name, val in kw.items():
        if name not in ("num_warps", "num_stages"):
            sig[name] = "constexpr"
            consts[name] = val
    return {name: sig[name] for name in params}, consts, attrs  # in parameter order, as the JIT's


def compile_launch(fn, args, kw, target: int = 90):
    """One recorded launch compiled for sm_<target> as the JIT would specialise it (``_signature``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    sig, consts, attrs = _signature(fn, args, kw)
    opts = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
    return triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", target, 32), options=opts)


def compile_report(calls, target: int) -> list[dict]:
    import triton
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows, seen = [], set()
    for fn, args, kw in calls:
        sig, consts, attrs = _signature(fn, args, kw)
        opts = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
        key = (fn.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())),
               tuple(sorted(attrs)), tuple(sorted(opts.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = compile_launch(fn, args, kw, target)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        reg = re.search(r"REG:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        flags = ",".join([k for k, v in consts.items() if k.startswith(("HAS_", "CAUSAL", "ACCUMULATE", "COPY")) and v]
                         + ([f"DOT={consts['DOT']}"] if "DOT" in consts else [])) or "-"
        rows.append({"kernel": fn.fn.__name__, "flags": flags,
                     "blocks": ",".join(f"{k}={v}" for k, v in consts.items() if k.startswith("B")),
                     "warps": opts.get("num_warps"), "stages": opts.get("num_stages"),
                     "regs": int(reg.group(1)) if reg else None,
                     "spill_bytes": int(stack.group(1)) if stack else None,
                     "smem": compiled.metadata.shared, "gmma": sass.count("GMMA"),
                     "local_loads": sass.count("LDL")})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lctrain.bench.kernel_resources",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--D", type=int, default=128, help="head dim of q/k and v (default 128)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--cfg", default="", metavar="KEY=INT[,KEY=INT]",
                   help="launch settings, as LCTRAIN_TRITON_CFG (see ops.set_config)")
    p.add_argument("--target", type=int, default=90, help="compute capability x10 (default 90)")
    p.add_argument("--varlen", action="store_true",
                   help="the launches of packed documents (cu_seqlens): the varlen kernels")
    p.add_argument("--op", choices=["mixers", "deltaformer", "loglinear"], default="mixers",
                   help="the linear mixers' kernels (default) or Deltaformer's u-pass kernels (float32 tensors, "
                        "TF32 dots as kernel_dots='tf32'; with --half-dots those of kernel_dots='half', the "
                        "default for bf16 / fp16 inputs; --dtype float32: full-precision dots as for float32 inputs; "
                        "--cfg and --varlen do not apply), or the fused log-linear kernels (--cfg: the level "
                        "kernels' settings, as LCTRAIN_LOGLINEAR_CFG; --varlen does not apply)")
    p.add_argument("--half-dots", action="store_true",
                   help="--op deltaformer: the launches of kernel_dots='half' (dots in --dtype, bf16 / fp16)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.half_dots and args.op != "deltaformer":
        p.error("--half-dots applies to --op deltaformer")
    if args.op == "deltaformer":
        bad = [f for f, given in (("--cfg", args.cfg), ("--varlen", args.varlen)) if given]
        if bad:
            p.error(f"{', '.join(bad)} do not apply to --op deltaformer")
        if args.half_dots and args.dtype == "float32":
            p.error("--half-dots rounds the dots to --dtype: use --dtype bfloat16 or float16")
        import torch
        half = getattr(torch, args.dtype) if args.half_dots else None
        calls = record_deltaformer_launches(args.D, tf32=args.dtype != "float32", half=half)
    elif args.op == "loglinear":
        if args.varlen:
            p.error("--varlen does not apply to --op loglinear")
        from lctrain.kernels.loglinear import triton_levels
        if args.cfg:
            triton_levels.set_levels_config(**triton_levels.parse_levels_config(args.cfg))
        calls = record_loglinear_launches(args.D, args.dtype)
    else:
        from lctrain.kernels.triton import ops
        if args.cfg:
            ops.set_config(**{k.strip(): int(v) for k, v in (i.split("=") for i in args.cfg.split(","))})
        calls = record_launches(args.D, args.dtype, args.varlen)
    rows = compile_report(calls, args.target)
    cols = ["kernel", "flags", "warps", "stages", "regs", "spill_bytes", "local_loads", "smem", "gmma",
            "blocks"]
    print("  ".join(cols))
    for r in rows:
        print("  ".join(str(r[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
