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
