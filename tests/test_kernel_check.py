"""lctrain.bench.kernel_check's cases on CPU through the Triton interpreter (tiny shapes, float32): the layouts
that replay how the log-linear ops call the plain op, and the log-linear cases (issue 18). A smoke test that
they run and agree with the torch backend; on a GPU the same cases decide the fault."""
import os

import pytest
import torch

from lctrain.bench import kernel_check

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU runs)")


@pytest.mark.parametrize("layout,variant", [
    (dict(B=1, T=20, offset=45, init=False, q_is_k=True), "default"),   # "lastblock": one partial chunk of a view
    (dict(B=3, T=16, init=False), "default"),                              # "blocks128": short batch rows
    (dict(B=1, T=20, shift=True, init=False), "unaligned"),                # unaligned pointers, no copy
])
def test_replay_layouts_run_and_agree(monkeypatch, layout, variant):
    monkeypatch.setitem(kernel_check.LAYOUTS, "tiny", layout)
    err = kernel_check.run_case(dict(kind="gated_delta", dims=[2, 16, 16], layout="tiny", dtype="float32",
                                     variant=variant))
    assert set(err) >= {"o", "state", "dk", "dv", "dg", "dbeta"}
    assert ("dq" in err) != layout.get("q_is_k", False) and "dinitial_state" not in err  # q is k: no dq leaf
    assert max(err.values()) < 1e-4, err


def test_replay_layouts_place_inputs_as_described():
    """offset: a view into a longer tensor; shift: a contiguous view 4 bytes off a 16-byte boundary."""
    t = torch.randn(1, 20, 2)
    v = kernel_check._placed(t, dict(offset=45), "cpu")
    assert v.storage_offset() == 90 and torch.equal(v, t)
    s = kernel_check._placed(t, dict(shift=True), "cpu")
    assert s.is_contiguous() and s.data_ptr() % 16 != 0 and torch.equal(s, t)
    names = {c["layout"] for c in kernel_check.grid(quick=True)}
    assert set(kernel_check.REPLAY) <= names


def test_loglinear_case_runs():
    err = kernel_check.run_loglinear_case(dict(kind="ll_gdn", dims=[1, 16, 16], layout="T70", dtype="float32",
                                               variant="triton_composed"))
    assert max(err.values()) < 1e-4, err


def test_groups_split_by_dtype_and_variant_with_bf16_defaults_first():
    """One worker group per mixer, head dims, dtype and variant (they share no compiled kernel), bfloat16 and the
    default settings started first, so that a run cut short by its time limit misses the least important cases."""
    layouts = ("shift", "shift_T32", "T32", "lastblock")
    items = [{"i": i, "case": c} for i, c in enumerate(c for c in kernel_check.grid(quick=True)
                                                       if c["layout"] in layouts)]
    groups = kernel_check.case_groups(items + [{"i": -1, "case": kernel_check.loglinear_grid()[0]}])
    assert sorted(it["i"] for g in groups for it in g) == [-1] + [it["i"] for it in items]
    keys = [{(it["case"]["kind"], tuple(it["case"]["dims"]), it["case"]["dtype"], it["case"]["variant"])
             for it in g} for g in groups]
    assert all(len(k) == 1 for k in keys)
    order = [next(iter(k)) for k in keys]
    assert {o[2:] for o in order[:9]} == {("bfloat16", "default")}
    variants = [o[3] for o in order[:-1]]
    assert variants.index("unaligned") > max(i for i, v in enumerate(variants) if v == "default")
    assert groups[-1][0]["i"] == -1   # the log-linear cases last, as before


def test_a_killed_grid_keeps_the_groups_it_finished(tmp_path, monkeypatch):
    """The JSON is rewritten (atomically, marked partial) as each group finishes: a run killed during its second
    group keeps the first group's cases with their verdicts."""
    import json

    calls = []

    def run_group(group, log, timeout):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # stands in for the kill from outside
        return {it["i"]: {"i": it["i"], "err": {"o": 1e-4}} for it in group}
    monkeypatch.setattr(kernel_check, "run_group", run_group)
    out = tmp_path / "kc.json"
    with pytest.raises(KeyboardInterrupt):
        kernel_check.main(["--json", str(out), "--jobs", "1", "--quick", "--kinds", "delta", "--dtypes", "float32"])
    result = json.loads(out.read_text())
    first = {(c["kind"], tuple(c["dims"]), c["dtype"], c["variant"]) for c in result["cases"]}
    assert result["partial"] and len(first) == 1 and all(c["verdict"] == "ok" for c in result["cases"])
    assert result["notes"][0].startswith("partial: written after 1 of ")
