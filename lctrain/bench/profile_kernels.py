"""Developer tool: per-kernel GPU time of one fwd+bwd of our mixers and fla's, via torch.profiler.

    python -m lctrain.bench.profile_kernels [--T 131072] [--H 16] [--D 128] [--no-fla]
    python -m lctrain.bench.profile_kernels --methods ll_gdn gated_delta ll_mamba2 gla   # log-linear ops

Prints, for each method, the kernels sorted by total CUDA time (where the time goes), to guide
tuning. Not a benchmark: timings under the profiler carry its overhead; use `lctrain bench kernels`.
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
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .kernels import _load_fla, _make_inputs, _method_fns
    notes: list[str] = []
    fla = None
    methods = [m for m in args.methods if not (args.no_fla and m.startswith("fla_"))]
    if any(m.startswith("fla_") for m in methods):
        *fla, _ = _load_fla(notes)
    x = _make_inputs(args.B, args.T, args.H, args.D, torch.bfloat16, "cuda")
    ll_x = None
    for m in methods:
        if m.startswith("ll_"):  # the log-linear ops, with the inputs of `lctrain bench loglinear`
            from .loglinear import _inputs as ll_inputs
            from .loglinear import _method as ll_method
            ll_x = ll_x or ll_inputs(args.B, args.T, args.H, args.D, torch.bfloat16, "cuda")
            (fwd, inputs), do = ll_method(m, ll_x, None), ll_x["do"]
        else:
            (fwd, inputs), do = _method_fns(m, x, fla), x["do"]
        for _ in range(2):  # compile / autotune first
            torch.autograd.grad(fwd(), inputs, do)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                torch.autograd.grad(fwd(), inputs, do)
            torch.cuda.synchronize()
        print(f"\n=== {m}  T={args.T} (3 iterations of fwd+bwd)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
