"""GPU memory of the fused log-linear ops (backend "triton"), checked on the CPU.

``lctrain.bench.loglinear_memory`` predicts the peak of one forward+backward by running the op's own
Python on meta tensors with every Triton launch skipped, under a tracker of storage lifetimes. Here: that
prediction is, allocation by allocation, what a real run does (CPU, Triton interpreter, tiny shapes); it
reproduces the H200 bench's measured peaks; and 1M tokens fit one H200 with the budget of the backward's
per-chunk states honoured.
"""
import os

import pytest
import torch

from lctrain.bench import loglinear_memory as lm

needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU runs)")


def _steps(trace):
    return [(live, a.nbytes, a.shape, a.dtype, a.site) for live, a in trace.timeline]


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="compares with a CPU (interpreter) run")
@pytest.mark.parametrize("tree", [0, 1])
def test_prediction_is_what_a_real_run_allocates(monkeypatch, tree):
    """ll_gdn, T=320 (5 chunks, levels 7, 8, 9 above the chunk), H=1, D=16, fp16, the backward's h/dh budget
    set to 2 levels x 2 chunks (so it runs in a group of 2 levels and one of 1, over 3 segments): every
    allocation of one fwd+bwd (size, shape, dtype, the line that made it) and the live bytes after it are
    the same on meta tensors with the launches skipped as in the real run. (The real run collects garbage
    after each launch: the interpreter keeps a launch's arguments in a reference cycle. No warm-up call,
    to keep it short: the work lists are then allocated in both.) tree=1: the same through the transition tree
    (TREE=1, the default from position 0), which has no segments."""
    from lctrain.kernels.loglinear import triton_levels
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, "TREE": tree})
    T, H, D = 320, 1, 16
    monkeypatch.setattr(triton_levels, "STATE_BUDGET", 2 * 2 * (2 * H * D * D * 2))
    monkeypatch.setattr(triton_levels, "_WORK", {})
    predicted = lm.fwd_bwd_trace("gdn", 1, T, H, D, torch.float16, warmup=False)
    real = lm.fwd_bwd_trace("gdn", 1, T, H, D, torch.float16, device="cpu", warmup=False)
    assert _steps(predicted) == _steps(real)
    assert predicted.peak == real.peak > 0
    sites = {a.site.split(" ")[0] for _, a in predicted.timeline}
    if tree:
        assert any(s.startswith("kernels/loglinear/triton_tree.py") for s in sites)      # the tree's buffers
        assert not any(s.startswith("kernels/loglinear/triton_levels.py") for s in sites)
        return
    assert any(s.startswith("kernels/loglinear/triton_levels.py") for s in sites)  # the level buffers are seen
    assert sum("ck = torch.empty" in a.site for _, a in predicted.timeline) == 1    # segment checkpoints


@pytest.mark.parametrize("kind,T,tree,mib", [("gdn", 16384, 1, 1978), ("gdn", 65536, 1, 8458),
                                             ("gdn", 131072, 1, 17450),
                                             ("gdn", 16384, 0, 2882), ("gdn", 65536, 0, 13600),
                                             ("mamba2", 16384, 0, 2721), ("mamba2", 65536, 0, 12956)])
def test_prediction_matches_the_h200_bench(monkeypatch, kind, T, tree, mib):
    """The bench's rows (BENCHMARKS.md, "Log-linear kernels", H200, 2026-12-01: B=1, H=16, D=128, bf16, column
    "peak MiB") are predicted to the MiB: ll_gdn through the level scans (TREE=0, eighth session), ll_mamba2
    through the scans. A change that moves them should say so: update these from the prediction and measure again
    on the GPU. (Since the bench's level weights are bf16, the op's fp32 copy of them is part of the peak: 15 /
    68 MiB above the 2026-11-30 figures with fp32 weights, 2,867 / 13,532 and 2,706 / 12,888.)
    ll_gdn through the transition tree (TREE=1): the ninth session measured 2,499.1 / 11,070.3 / 23,202.5 MiB at
    16K / 64K / 128K, which the prediction then matched to the MiB. Since the tenth session the queries each bucket
    reads are stored compacted (half the rows): the H200 then measured 1,987.1 / 8,510.3 / 17,570.5 MiB, each
    within 1 KiB of the prediction (docs/results/h200_2026-12-01_s10/call1/). The eleventh session moved the level
    weights' gradient into the Function (no [B, T, H, L] temporaries through autograd) and the prediction fell to
    1,978.1 / 8,458.2 / 17,450.5 MiB, which the H200 bench then measured (docs/results/h200_2026-12-01_s11/call1/)."""
    from lctrain.kernels.loglinear import triton_levels
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, "TREE": tree})
    trace = lm.fwd_bwd_trace(kind, 1, T, 16, 128, torch.bfloat16)
    assert round(trace.peak / 2**20) == mib


@pytest.mark.parametrize("tree,mib", [(0, 26200), (1, 17714)])
def test_prediction_with_kept_level_states_matches_the_h200_bench(monkeypatch, tree, mib):
    """KEEP_H=1 at 128K: with the level scans (h of all 11 levels kept from the forward beside dh of a group of
    8 in the backward) the H200 bench's peak, 26,200 MiB (2026-12-01, eighth session), against 23,128 MiB
    recomputing; with the transition tree (the tree and the queries each bucket read kept) the ninth session
    measured 23,202.5 MiB, the same as recomputing; with the compacted bucket queries (tenth session) 17,922.5 MiB
    (17,570.5 recomputing), measured and predicted alike; since the eleventh session 17,714.5, predicted and measured
    (docs/results/h200_2026-12-01_s11/call1/)."""
    from lctrain.kernels.loglinear import triton_levels
    monkeypatch.setattr(triton_levels, "CONFIG", {**triton_levels.CONFIG, "KEEP_H": 1, "TREE": tree})
    trace = lm.fwd_bwd_trace("gdn", 1, 131072, 16, 128, torch.bfloat16)
    assert round(trace.peak / 2**20) == mib


def test_one_million_tokens_fit_one_h200():
    """ll_gdn at 1M tokens (B=1, H=16, D=128, bf16): h and dh of the backward stay within STATE_BUDGET (it
    cuts the sequence into segments), one fwd+bwd peaks at <= 70 GiB, and with the bench's inputs (17.9
    GiB) it leaves more than 40 GiB of an H200's ~139 GiB; 512K peaks at <= 45 GiB."""
    from lctrain.kernels.loglinear import triton_levels
    T = 1 << 20
    trace = lm.fwd_bwd_trace("gdn", 1, T, 16, 128, torch.bfloat16)
    states = [a for _, a in trace.timeline if "hs = torch.empty" in a.site]   # hs, dhs [G, B, NT, H, K, V]
    assert states and max(a.nbytes for a in states) * 2 <= triton_levels.STATE_BUDGET
    assert max(a.shape[2] for a in states) < T // 64                      # segments of the sequence
    inputs = lm.input_bytes(lm.bench_inputs("gdn", 1, T, 16, 128, torch.bfloat16, "meta"))
    assert trace.peak <= 70 << 30 and trace.peak + inputs <= 99 << 30
    assert lm.fwd_bwd_trace("gdn", 1, T // 2, 16, 128, torch.bfloat16).peak <= 45 << 30


def test_torch_operations_around_the_kernels_stay_small():
    """One fwd+bwd of ll_gdn at 64K (B=1, H=16, D=128, bf16; the transition tree, the default): the torch operations
    around the Triton kernels move under 0.5 GB. They moved 8.0 GB until the eleventh session: fp32 adds and casts over
    [T, H, D], the tree's gradient buffers zero-filled, the level weights' temporaries through autograd. That was
    about 2 ms of a 24.5 ms step on an H200. Since then they move 0.37 GB. A change that brings such a pass back fails
    here, and ``python -m lctrain.bench.loglinear_memory --T 65536 --torch-ops`` names it."""
    ops = lm.torch_op_bytes("gdn", 1, 65536, 16, 128, torch.bfloat16)
    top = sorted(ops, key=lambda o: -o.nbytes)[:3]
    assert sum(o.nbytes for o in ops) < 0.5e9, [(o.op, o.nbytes, o.site) for o in top]

