"""Developer tool: per-kernel GPU time of one fwd+bwd of our mixers and fla's, via torch.profiler.

    python -m lctrain.bench.profile_kernels [--T 131072] [--H 16] [--D 128] [--no-fla]
                                            [--docs 64] [--cfg KEY=INT[,KEY=INT]]
    python -m lctrain.bench.profile_kernels --methods ll_gdn gated_delta ll_mamba2 gla   # log-linear ops

Prints, for each method, the kernels sorted by total CUDA time (where the time goes), to guide
tuning. ``--docs N``: the same T tokens packed as N documents (cu_seqlens, the layout of
``lctrain bench varlen``) for ours and fla's varlen path, to see which kernels the packed path
loses on. ``--cfg``: our launch settings (``ops.set_config``). Not a benchmark: timings under the
profiler carry its overhead; use `lctrain bench kernels` / `lctrain bench varlen`.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lctrain.bench.profile_kernels")
    p.add_argument("--T", type=int, default=131072)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--methods", nargs="+", default=["delta", "gated_delta", "gla", "fla_delta",
                                                    "fla_gated_delta"])
    p.add_argument("--docs", type=int, default=None,
                   help="pack the T tokens as this many documents (cu_seqlens; B must be 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document lengths (default 0)")
    p.add_argument("--rows", type=int, default=16, help="kernels listed per method, most time first (default 16)")
    p.add_argument("--fwd", action="store_true",
                   help="profile the forward alone (under no_grad): which launches the forward adds")
    p.add_argument("--by-source", type=int, default=0, metavar="N",
                   help="also list the torch operators (not the Triton kernels, which the first table names) by the "
                        "innermost N Python frames that called them, most CUDA time first: which line of ours "
                        "launches the small elementwise kernels (default 0: off)")
    p.add_argument("--cfg", default="", metavar="KEY=INT[,KEY=INT]",
                   help="our launch settings, as LCTRAIN_TRITON_CFG (see ops.set_config)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.docs is not None and (args.B != 1 or not 1 <= args.docs <= args.T):
        p.error(f"--docs needs --B 1 and 1 <= docs <= T (got B={args.B}, docs={args.docs}, T={args.T})")
    if args.docs is not None and any(m.startswith("ll_") for m in args.methods):
        p.error("--docs packs the chunk mixers and fla's; the log-linear ll_* methods take no cu_seqlens here")
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lctrain.kernels.triton import ops

    from .kernels import _load_fla, _make_inputs, _method_fns
    from .varlen import _fla, _ours, document_bounds
    if args.cfg:
        ops.set_config(**{k.strip(): int(v) for k, v in (i.split("=") for i in args.cfg.split(","))})
    notes: list[str] = []
    fla = None
    methods = [m for m in args.methods if not (args.no_fla and m.startswith("fla_"))]
    if any(m.startswith("fla_") for m in methods):
        *fla, _ = _load_fla(notes)
    x = _make_inputs(args.B, args.T, args.H, args.D, torch.bfloat16, "cuda")
    cu = None
    if args.docs is not None:
        bounds = document_bounds(args.T, args.docs, args.seed)
        cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        print(f"packed: {args.docs} documents of {min(lengths)} .. {max(lengths)} tokens (seed {args.seed})")
    ll_x = None
    for m in methods:
        if m.startswith("ll_"):  # the log-linear ops, with the inputs of `lctrain bench loglinear`
            from .loglinear import _inputs as ll_inputs
            from .loglinear import _method as ll_method
            ll_x = ll_x or ll_inputs(args.B, args.T, args.H, args.D, torch.bfloat16, "cuda",
                                     shard="ll_gdn_shard" in methods)
            (fwd, inputs), do = ll_method(m, ll_x, None), ll_x["do"]
        elif cu is None:
            (fwd, inputs), do = _method_fns(m, x, fla), x["do"]
        elif m.startswith("fla_"):
            (fwd, inputs), do = _fla(m[len("fla_"):], x, cu.long(), fla), x["do"]
        else:
            (fwd, inputs), do = _ours(m, x, cu), x["do"]
        def step(fwd=fwd, inputs=inputs, do=do):
            if args.fwd:
                with torch.no_grad():
                    fwd()
            else:
                torch.autograd.grad(fwd(), inputs, do)

        for _ in range(2):  # compile / autotune first
            step()
        torch.cuda.synchronize()
        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.by_source else [])
        # (the Python frames come only with the verbose experimental config: with_stack alone records none,
        # pytorch#100253)
        stacks = dict(with_stack=True, experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True))
        with profile(activities=activities, **(stacks if args.by_source else {})) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        what = "" if cu is None else f" packed as {args.docs} documents"
        print(f"\n=== {m}  T={args.T}{what} (3 iterations of {'fwd' if args.fwd else 'fwd+bwd'})", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60),
              flush=True)
        if args.by_source:
            print(f"--- {m}: torch operators by their innermost {args.by_source} Python frames", flush=True)
            print(_torch_ops_by_source(prof, args.by_source, args.rows), flush=True)
    return 0


def _torch_ops_by_source(prof, frames: int, rows: int) -> str:
    """The aten operators of ``prof`` (recorded with stacks) grouped by operator and call site, as lines
    "CUDA ms  calls  operator  site" with the most CUDA time (of the kernels each launched) first."""
    events = [e for e in prof.key_averages(group_by_stack_n=frames)
              if e.key.startswith("aten::") and e.device_type.name == "CPU"]
    def cuda_ms(e):
        return getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / 1e3
    # (an operator nested in another, e.g. aten::copy_ inside aten::to, counts its kernels in both: the
    # innermost with time is the one to read)
    events.sort(key=cuda_ms, reverse=True)
    lines = [f"{'CUDA ms':>9} {'calls':>6}  operator / call site (innermost frame first)"]
    for e in events[:rows]:
        if cuda_ms(e) <= 0:
            break
        site = " <- ".join(s.strip() for s in e.stack[:frames]) or "?"
        lines.append(f"{cuda_ms(e):9.3f} {e.count:6d}  {e.key}  {site}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
