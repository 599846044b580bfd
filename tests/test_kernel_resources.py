"""The resource-report tool sees every launch ops makes, with every kernel parameter bound.

The tool compiles those launches for sm_90 on a GPU-less machine; that compile is not run here,
because the CPU tests load the kernels in interpreter mode."""
import inspect

import pytest

from lctrain.bench.kernel_resources import record_launches


@pytest.mark.parametrize("varlen", [False, True])
def test_records_every_kernel_launch_of_the_three_mixers(varlen):
    calls = record_launches(32, "bfloat16", varlen)
    assert all(bool(kw["IS_VARLEN"]) == varlen for _, _, kw in calls)
    names = {getattr(fn, "fn", fn).__name__ for fn, _, _ in calls}
    assert names == {"wy_solve_kernel", "wy_apply_kernel", "state_fwd_kernel", "output_fwd_kernel",
                     "dv_local_kernel", "state_bwd_kernel", "dqk_kernel", "wy_bwd_kernel"}
    for fn, args, kw in calls:
        params = inspect.signature(getattr(fn, "fn", fn)).parameters
        bound = len(args) + len([k for k in kw if k not in ("num_warps", "num_stages")])
        assert bound == len(params) and "num_warps" in kw


def test_records_every_deltaformer_kernel_launch():
    from lctrain.bench.kernel_resources import record_deltaformer_launches
    calls = record_deltaformer_launches(32)
    names = {getattr(fn, "fn", fn).__name__ for fn, _, _ in calls}
    assert names == {"_partials_kernel", "_finalize_kernel", "_intra_probs_kernel", "_chunk_solve_kernel",
                     "_chunk_solve_t_kernel", "_push_kernel", "_dk_rows_kernel", "_dk_cols_kernel"}
    for fn, args, kw in calls:
        params = inspect.signature(getattr(fn, "fn", fn)).parameters
        bound = len(args) + len([k for k in kw if k not in ("num_warps", "num_stages")])
        assert bound == len(params) and "num_warps" in kw


def test_deltaformer_kernels_compile_for_hopper():
    """Every Deltaformer kernel launch of bf16 / fp16 inputs (TF32 dots) compiles for sm_90 (in a
    subprocess: here Triton interprets) within Hopper's 227 KiB of shared memory and without register
    spills. The interpreter does not catch compile-only errors (a non-constexpr global in a kernel
    failed only on the GPU)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    for half in ([], ["--half-dots"]):          # and those of kernel_dots="half" (bf16 dot operands)
        out = subprocess.run([sys.executable, "-m", "lctrain.bench.kernel_resources", "--op", "deltaformer", "--D",
                              "128", *half], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = out.stdout.strip().splitlines()
        cols = lines[0].split()
        rows = [dict(zip(cols, line.split())) for line in lines[1:]]
        assert len({r["kernel"] for r in rows}) == 8
        for r in rows:
            assert int(r["smem"]) <= 227 * 1024 and r["spill_bytes"] == "0", r
            if r["kernel"] == "_chunk_solve_kernel":   # the solves' dots are float32 always
                assert ("COPY" in r["flags"]) == bool(half), r
            elif r["kernel"] != "_chunk_solve_t_kernel":
                assert ("DOT=bf16" in r["flags"]) == bool(half), r


_ONE_CHUNK_PROBE = """
import sys
from lctrain.bench.kernel_resources import compile_launch, record_launches
for D in (64, 128):
    for T in (32, 64):   # one partial / one full chunk: the chunk count NT is 1
        calls = [c for c in record_launches(D, "bfloat16", T=T) if c[0].fn.__name__ == "state_fwd_kernel"]
        assert calls
        for fn, args, kw in calls:
            ttgir = compile_launch(fn, args, kw).asm["ttgir"]
            print(D, T, "loop" if "scf.for" in ttgir else "straight")
"""


def test_one_chunk_state_pass_compiles_to_the_looped_kernel():
    """With one chunk (NT == 1) the forward state pass must compile to the same looped kernel as longer runs:
    Triton compiles an int argument equal to 1 as a constant, and state_fwd_kernel's chunk loop with a constant
    trip count of 1 became straight-line code that gave a wrong final state on an H200 in bf16 at head dims 64 /
    128 (kernel_check, 2026-12-01; docs/kernels-notes.md). Compiled for sm_90 in a subprocess (no GPU needed;
    here Triton interprets), with the launch's ints specialised as the JIT does."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", _ONE_CHUNK_PROBE], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    kinds = [line.split()[-1] for line in lines if line.strip()]
    assert kinds and set(kinds) == {"loop"}, out.stdout


def test_records_every_loglinear_kernel_launch():
    """`--op loglinear` replays the fused log-linear op's forward and backward (Gated DeltaNet and Mamba-2) on
    meta tensors; the replay broke once when the autograd function gained an argument."""
    from lctrain.bench.kernel_resources import record_loglinear_launches
    calls = record_loglinear_launches(32, "bfloat16")
    names = {getattr(fn, "fn", fn).__name__ for fn, _, _ in calls}
    assert {"levels_fwd_kernel", "levels_dstate_kernel", "levels_grad_state_kernel",
            "levels_grad_query_kernel"} <= names
    for fn, args, kw in calls:
        params = inspect.signature(getattr(fn, "fn", fn)).parameters
        bound = len(args) + len([k for k in kw if k not in ("num_warps", "num_stages")])
        assert bound == len(params) and "num_warps" in kw
