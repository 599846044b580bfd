"""Eval-time position scaling (model.rope.scaling / factor on `lctrain eval ...`): it rebuilds the
rotary embedding of a trained checkpoint and nothing else; other model keys stay refused."""
from __future__ import annotations

import pytest
import torch
from test_eval import make_checkpoint

from lctrain.eval import runtime

ROPE_ALL = ["model.rope.layers=all"]


@pytest.fixture(scope="module")
def rope_ckpt(tmp_path_factory):
    import test_eval
    tiny = test_eval.TINY
    test_eval.TINY = tiny + ROPE_ALL  # the global layer rotates too
    try:
        return make_checkpoint(tmp_path_factory.mktemp("run") / "rope")
    finally:
        test_eval.TINY = tiny


def _load(ckpt, overrides):
    cfg = runtime.eval_config(ckpt, None, overrides)
    ctx = runtime.EvalContext(device=torch.device("cpu"), autocast_dtype=None, cp_group=None, cp_rank=0, cp_size=1,
                              dp_rank=0, dp_size=1, main=True)
    return runtime.load_models(ckpt, ctx, cfg)[0]


@pytest.mark.parametrize("scaling", ["ntk", "yarn"])
def test_eval_scaling_changes_positions_only(rope_ckpt, scaling):
    plain = _load(rope_ckpt, [])
    scaled = _load(rope_ckpt, [f"model.rope.scaling={scaling}", "model.rope.factor=4"])
    a, b = plain.state_dict(), scaled.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # no weight touched
    ropes = {id(blk.mixer.rope) for blk in scaled.blocks if getattr(blk.mixer, "rope", None) is not None}
    assert len(ropes) == 1
    rope = next(blk.mixer.rope for blk in scaled.blocks if getattr(blk.mixer, "rope", None) is not None)
    assert rope.rotary_dim == 8 and not torch.equal(rope.inv_freq, plain.blocks[1].mixer.rope.inv_freq)
    if scaling == "yarn":  # the original context defaults to the checkpoint's data.seq_len
        from lctrain.models.rope import rope_inv_freq
        torch.testing.assert_close(rope._theta64, rope_inv_freq(8, 10000.0, "yarn", 4.0, 64)[0])
    ids = torch.randint(0, 200, (1, 20))
    with torch.no_grad():
        lp, ls = plain(ids), scaled(ids)
    if scaling == "ntk":  # position 0 is not rotated by either: the first token's logits agree
        torch.testing.assert_close(lp[:, 0], ls[:, 0])
    assert not torch.allclose(lp[:, 5:], ls[:, 5:], atol=1e-4)


def test_eval_refuses_other_model_keys(rope_ckpt):
    with pytest.raises(runtime.EvalError, match="model.rope.base.*cannot change.*model.rope.scaling"):
        runtime.eval_config(rope_ckpt, None, ["model.rope.base=500000"])
    with pytest.raises(runtime.EvalError, match="model.rope.factor"):
        runtime.eval_config(rope_ckpt, None, ["model.rope.scaling=ntk", "model.rope.factor=1"])
    with pytest.raises(runtime.EvalError, match="model.rope.scaling"):
        runtime.eval_config(rope_ckpt, None, ["model.rope.scaling=magic"])


def test_eval_accepts_rerope_on_the_global_layer(rope_ckpt):
    model = _load(rope_ckpt, ["model.rope.scaling=leaky_rerope", "model.rope.factor=8", "model.rope.rerope_window=16"])
    kinds = {blk.kind: getattr(blk.mixer, "rope", None) for blk in model.blocks}
    assert kinds["A"].rerope == (16, 1 / 8) and kinds["S"].rerope is None
    with pytest.raises(runtime.EvalError, match="rerope_window"):
        runtime.eval_config(rope_ckpt, None, ["model.rope.scaling=rerope"])
