"""Where a log-linear call waits on the host: for each method of `lctrain bench loglinear` named on the command
line, the host time of one fwd (and of one fwd+bwd) against its GPU time, and the first synchronisation with the
GPU that torch reports (torch.cuda.set_sync_debug_mode("error"), where it was raised). On the GPU machine:
    python3 .ci/device/host_probe.py --T 32768 ll_gdn ll_gdn_shard
"""
import argparse
import time
import traceback

import torch

from lctrain.bench.loglinear import _inputs, _method

p = argparse.ArgumentParser()
p.add_argument("--T", type=int, default=32768)
p.add_argument("methods", nargs="+")
a = p.parse_args()
x = _inputs(1, a.T, 16, 128, torch.bfloat16, "cuda", shard="ll_gdn_shard" in a.methods)
for m in a.methods:
    fwd, inputs = _method(m, x, None)
    for _ in range(3):
        torch.autograd.grad(fwd(), inputs, x["do"])
    torch.cuda.synchronize()
    for what in ("fwd", "fwd+bwd"):
        host, gpu = [], []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            e0.record()
            o = fwd()
            if what == "fwd+bwd":
                torch.autograd.grad(o, inputs, x["do"])
            e1.record()
            host.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
            gpu.append(e0.elapsed_time(e1))
        print(f"{m} T={a.T} {what}: host {min(host):.3f}-{max(host):.3f} ms, "
              f"GPU (events) {min(gpu):.3f}-{max(gpu):.3f} ms", flush=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.autograd.grad(fwd(), inputs, x["do"])
        print(f"{m}: no synchronising operation", flush=True)
    except RuntimeError:
        print(f"{m}: a synchronising operation:", flush=True)
        traceback.print_exc(limit=-12)
    finally:
        torch.cuda.set_sync_debug_mode(0)
