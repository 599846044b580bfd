"""`python -m lctrain.bench.variants` times other trees' state_fwd inside today's ops: the loaded
launchers must compute what today's does, and the swap must be undone (Triton interpreter)."""
import os
import shutil
import subprocess

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

from lctrain.kernels import gated_delta_rule  # noqa: E402
from lctrain.kernels.triton import ops, state  # noqa: E402

from lctrain.bench import variants  # noqa: E402

TRITON_DIR = os.path.dirname(state.__file__)
REPO = os.path.dirname(os.path.dirname(TRITON_DIR))


def _inputs(T=70, H=2, D=16):
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    k = torch.nn.functional.normalize(r(1, T, H, D), dim=-1)
    return r(1, T, H, D), k, r(1, T, H, D), torch.nn.functional.logsigmoid(r(1, T, H) + 2), torch.sigmoid(r(1, T, H))


def _same_state_fwd(launcher, compute_a):
    _, k, v, g, beta = _inputs()
    cfg = ops._Cfg(16, 16, gated=True, fp32=True)
    gam, _tm, w, ut = ops._wy_fwd(k, v, g, beta, cfg)
    kw = dict(store_h=True, store_vnew=True, store_final=True, compute_a=compute_a)
    want = state.state_fwd(k, w, ut, gam, None, cfg, **kw)
    got = launcher(k, w, ut, gam, None, cfg, **kw)
    assert (want[3] is None) == (not compute_a)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


def test_a_tree_loaded_from_a_folder_computes_what_todays_does(tmp_path):
    tree = tmp_path / "copy"
    shutil.copytree(TRITON_DIR, tree, ignore=shutil.ignore_patterns("__pycache__"))
    launcher = variants.load_tree_state_fwd(str(tree), "lctrain_variant_test_copy")
    for compute_a in (False, True):
        _same_state_fwd(launcher, compute_a)


def test_presplit_tree_computes_what_todays_does(tmp_path):
    """The one-file kernels of 5404906 (what the GPU comparison calls presplit), where git has them."""
    archive = subprocess.run(["git", "-C", REPO, "archive", "5404906", "kernels/triton"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip("commit 5404906 is not in this checkout's history")
    subprocess.run(["tar", "x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    launcher = variants.load_tree_state_fwd(str(tmp_path / "kernels" / "triton"), "lctrain_variant_test_presplit")
    _same_state_fwd(launcher, compute_a=True)
    _same_state_fwd(launcher, compute_a=False)


def test_using_swaps_the_launcher_and_settings_and_restores_them():
    q, k, v, g, beta = _inputs()
    want = gated_delta_rule(q, k, v, g, beta, backend="triton")[0]
    seen = []

    def spy(*a, **kw):
        seen.append(a[5].values["stages_seq"])
        return state.state_fwd(*a, **kw)
    before_fn, before_cfg = ops._state_fwd, ops.set_config()
    ops.set_config(**before_cfg)
    with variants._Using(spy, {"stages_seq": 2}):
        got = gated_delta_rule(q, k, v, g, beta, backend="triton")[0]
    assert seen == [2] and torch.equal(got, want)
    assert ops._state_fwd is before_fn and ops.set_config(**before_cfg) == before_cfg


def test_absent_trees_are_skipped_with_a_note(tmp_path):
    args = variants._parse(["--tree", f"gone:{tmp_path / 'none'}", "--settings", "stages2",
                            "--variant", "bvs32:BVS=32"])
    notes = []
    names = [(n, kv) for n, _, kv in variants._variants(args, notes)]
    assert names == [("current", {}), ("stages2", {"stages_seq": 2}), ("bvs32", {"BVS": 32})]
    assert "gone skipped" in notes[0] and "git archive COMMIT kernels/triton" in notes[0]
    with pytest.raises(SystemExit):
        variants._parse(["--tree", "nodir"])
