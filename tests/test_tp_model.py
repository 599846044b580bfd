"""Tensor parallelism (megatron-core layers on gloo) equals the one-process model exactly.

A tiny hybrid model with every layer kind (gated DeltaNet, sliding-window attention, DeltaNet,
Mamba-2, global attention) takes one training step with tp=2 x cp=2 (Ulysses on the local
heads); every rank's loss, every gradient and every updated parameter, gathered over the TP
group to full size, must equal the one-process step. Also: a tp=2 model built from the same seed
holds exactly the shards of the one-process model, and about half its parameters per rank.
"""
from __future__ import annotations

import pytest
import torch
from dist_utils import run_world
from test_cp_model import DTYPE, RTOL, _rel, one_step, sample, tiny_model_cfg

# The model is float64 but its logits are float32 (HybridLM.forward), and megatron's vocab-parallel
# cross-entropy sums them in another order than F.cross_entropy: ~1e-7 in the logit gradients,
# which reaches ~5e-5 relative on small reduced gradients (Mamba-2's D, whose largest entry is ~1e-4).
# The loss itself holds RTOL.
GRAD_RTOL = 2e-4


def tp_cfg():
    m = tiny_model_cfg("none")
    m.n_heads, m.attn_heads = 4, 4  # 2 heads per TP rank, 1 per TP x CP rank under Ulysses
    return m


def build(tp_group=None, cp_group=None):
    from lctrain.models import build_model

    torch.manual_seed(0)
    return build_model(tp_cfg(), cp_group=cp_group, tp_group=tp_group).to(DTYPE)


def tp_worker(rank, world, tp, cp):
    from lctrain.parallel import mesh
    from lctrain.parallel.tensor_parallel import full_state_dict

    mesh.init_mesh({"tp": tp, "cp": cp, "pp": 1}, "cpu")
    tp_group = mesh.tp_group()
    model = build(tp_group, mesh.cp_group())
    init = {k: v.clone() for k, v in full_state_dict(model, model.state_dict(), tp_group).items()}
    n_local = model.num_parameters()
    names = [n for n, _ in model.named_parameters()]
    loss, grads, params = one_step(model, [sample(100)], cp_group=mesh.cp_group(), cp_rank=mesh.cp_rank(), cp_size=cp,
                                   grad_group=mesh.dp_cp_group(), dp_size=mesh.dp_size(), tp_group=tp_group)
    return dict(loss=loss, n_local=n_local, init=init,
                grads=full_state_dict(model, dict(zip(names, grads)), tp_group),
                params=full_state_dict(model, dict(zip(names, params)), tp_group))


def check(results):
    ref_model = build()
    ref_init = {k: v.clone() for k, v in ref_model.state_dict().items()}
    names = [n for n, _ in ref_model.named_parameters()]
    ref_loss, ref_grads, ref_params = one_step(ref_model, [sample(100)])
    for rank, res in enumerate(results):
        assert abs(res["loss"] - ref_loss) <= RTOL * abs(ref_loss), (rank, res["loss"], ref_loss)
        assert set(res["init"]) == set(ref_init)
        for name, ref in ref_init.items():
            assert torch.equal(res["init"][name], ref), \
                f"rank {rank}: initial {name} differs from the one-process model"
        for name, ref_g, ref_p in zip(names, ref_grads, ref_params):
            assert _rel(res["grads"][name], ref_g) <= GRAD_RTOL, \
                f"rank {rank}: gradient of {name} differs by {_rel(res['grads'][name], ref_g):.2e}"
            assert _rel(res["params"][name], ref_p) <= GRAD_RTOL, f"rank {rank}: updated {name} differs"
    return ref_model.num_parameters()


@pytest.mark.slow
def test_tp2_times_cp2_training_step_equals_one_process_and_halves_parameters():
    """4 ranks: TP groups of 2 inside CP groups of 2 (one run covers the TP math and TP x CP)."""
    results = run_world(tp_worker, 4, 2, 2, timeout=400, init_process_group=False)
    total = check(results)
    # every weight matrix and the (tied) embedding are split; only the norms are replicated
    assert all(0.5 * total <= r["n_local"] <= 0.52 * total for r in results), (total, [r["n_local"] for r in results])
