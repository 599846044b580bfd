"""The per-kernel tuning tool (lctrain.bench.tune_kernels), through the Triton interpreter."""
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

from lctrain.kernels.triton import ops  # noqa: E402

from lctrain.bench import tune_kernels as tk  # noqa: E402


def test_every_candidate_tunes_only_its_own_kernel():
    """Kernels are tuned independently, which holds only if no candidate touches another's keys."""
    for kernel in tk.KERNELS:
        cands = tk.candidates(kernel, 128, 128)
        assert cands[0] == {} and len(cands) > 4
        for c in cands:
            assert set(c) <= set(ops.KERNEL_KEYS[kernel]), (kernel, c)
            ops._Cfg(128, 128, c)  # and _Cfg takes it


def _grid(kernel, K, V):
    return {"dqk": [{}, {"BKD": 16, "BVD": 16, "warps_dqk": 2}],
            "wy_bwd": [{}, {"BKB": 16, "BVB": 16}]}.get(kernel, [{}])


def test_tune_times_and_checks_each_candidate():
    r = tk.tune(["gated_delta"], ["dqk", "wy_bwd"], 128, 32, 0, 0, log=lambda s: None, H=2,
                device="cpu", dtype_name="float32", grid=_grid)
    for kernel in ("dqk", "wy_bwd"):
        rows = r["gated_delta"][kernel]["rows"]
        assert len(rows) == 2 and all(row["ok"] and row["ms"] > 0 for row in rows)
        assert rows[1]["rel_err"] < 1e-4  # other blocks, same math
    assert "SUM fwd+bwd" in tk.summary(r)


def test_tune_flags_a_candidate_whose_output_differs(monkeypatch):
    real = ops._dqk

    def wrong_for_small_blocks(q, k, vnew, do, h, dh, du, gam, scale, cfg):
        dq, dk, dw, dgam = real(q, k, vnew, do, h, dh, du, gam, scale, cfg)
        return (dq * 2 if cfg.BKD == 16 else dq), dk, dw, dgam

    monkeypatch.setattr(ops, "_dqk", wrong_for_small_blocks)
    r = tk.tune(["delta"], ["dqk"], 64, 32, 0, 0, log=lambda s: None, H=1, device="cpu",
                dtype_name="float32", grid=_grid)["delta"]["dqk"]
    assert r["rows"][0]["ok"] and not r["rows"][1]["ok"]
    assert r["best"]["cfg"] == {}


def test_tune_cli_refuses_lengths_that_change_compilation():
    with pytest.raises(SystemExit):
        tk.main(["--T", "1000"])


@pytest.mark.parametrize("method", ["delta", "gated_delta", "gla"])
def test_accuracy_helpers_name_every_gradient_and_see_agreement(method):
    """The bench's accuracy line and `--accuracy-of` share these: one name per output/gradient, and
    our Triton kernels (interpreter, float32) agree with the float32 torch reference."""
    import torch

    from lctrain.bench.kernels import _float32_inputs, _grad_names, _make_inputs, _outputs_and_grads, _rel_diff
    x = _make_inputs(1, 80, 2, 16, torch.float32, "cpu")
    ref = _outputs_and_grads("ref_" + method, _float32_inputs(x), None)
    ours = _outputs_and_grads(method, x, None)
    assert len(ours) == len(ref) == len(_grad_names(method))
    assert max(_rel_diff(a, b) for a, b in zip(ours, ref)) < 1e-3


def test_timing_json_is_kept_when_the_sweep_is_killed(tmp_path, monkeypatch):
    """The timing process rewrites --json after every kernel (marked partial): killed during the second length,
    the sweep keeps the first length's results and the part of the second it timed."""
    import json

    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")

    def tune(methods, kernels, T, D, warmup, rep, log, skip, done, save):
        save({"delta": {"dqk": {"default_ms": T / 1000}}})
        if T == 2048:
            raise KeyboardInterrupt  # stands in for the device call's kill
        return {"delta": {"dqk": {"default_ms": T / 1000}}}
    monkeypatch.setattr(tk, "tune", tune)
    state, out = tmp_path / "state.json", tmp_path / "tune.json"
    state.write_text(json.dumps({"skip": [], "results": {}}))
    args = tk.argparse.Namespace(state=str(state), json=str(out), T=[1024, 2048], D=32, methods=["delta"],
                                 kernels=["dqk"], warmup=0, rep=0)
    with pytest.raises(KeyboardInterrupt):
        tk._timing_child(args, log=lambda s: None)
    result = json.loads(out.read_text())
    assert result["partial"] and set(result["results"]) == {"1024", "2048"} and result["gpu"] == "Fake GPU"
    assert result["notes"] == ["partial: written after 1 of 2 lengths, plus part of the next; the run ended before "
                               "the others (a time limit or a kill)"]
    assert set(json.loads(state.read_text())["results"]) == {"1024", "2048"}
