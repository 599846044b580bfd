"""Tensor parallelism (megatron-core layers on gloo) equals the one-process model exactly.

Tiny hybrid models with every layer kind take one training step with tp=2 x cp=2 (Ulysses on the
local heads): gated DeltaNet, sliding-window attention, DeltaNet, Mamba-2 and global attention in
one model; log-linear gated DeltaNet, log-linear Mamba-2 (level weights split with their heads),
Deltaformer and multi-head latent attention (heads split, latent replicated) in another. Every
rank's loss, every gradient and every updated parameter, gathered over the TP group to full size,
must equal the one-process step. Also: a tp=2 model built from the same seed holds exactly the
shards of the one-process model, and about half its parameters per rank. And the vocab-parallel
loss in sequence chunks (train.loss_chunk_tokens) equals the unchunked one under tp=2.
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


def tp_cfg(pattern: str = "GSDMA"):
    m = tiny_model_cfg("none")
    m.n_heads, m.attn_heads = 4, 4  # 2 heads per TP rank, 1 per TP x CP rank under Ulysses
    m.layer_pattern = pattern
    if any(c in "LK" for c in pattern):
        m.loglinear_levels = 5  # reaches position 15 (SEQ_LEN 16)
        m.document_end_id = None  # the log-linear layers take no packed documents under CP
    if "A" in pattern and "G" not in pattern:  # the second model: its global layer is MLA
        m.mla_kv_rank, m.mla_rope_dim, m.attn_conv_size = 6, 4, 0
    return m


def build(tp_group=None, cp_group=None, pattern: str = "GSDMA"):
    from lctrain.models import build_model

    torch.manual_seed(0)
    return build_model(tp_cfg(pattern), cp_group=cp_group, tp_group=tp_group).to(DTYPE)


def tp_worker(rank, world, tp, cp, pattern):
    from lctrain.parallel import mesh
    from lctrain.parallel.tensor_parallel import full_state_dict

    mesh.init_mesh({"tp": tp, "cp": cp, "pp": 1}, "cpu")
    tp_group = mesh.tp_group()
    model = build(tp_group, mesh.cp_group(), pattern)
    init = {k: v.clone() for k, v in full_state_dict(model, model.state_dict(), tp_group).items()}
    n_local = model.num_parameters()
    names = [n for n, _ in model.named_parameters()]
    loss, grads, params = one_step(model, [sample(100)], cp_group=mesh.cp_group(), cp_rank=mesh.cp_rank(), cp_size=cp,
                                   grad_group=mesh.dp_cp_group(), dp_size=mesh.dp_size(), tp_group=tp_group)
    return dict(loss=loss, n_local=n_local, init=init,
                grads=full_state_dict(model, dict(zip(names, grads)), tp_group),
                params=full_state_dict(model, dict(zip(names, params)), tp_group))


def check(results, pattern: str):
    ref_model = build(pattern=pattern)
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
@pytest.mark.parametrize("pattern, replicated_share", [
    ("GSDMA", 0.02),  # every weight matrix and the (tied) embedding are split; only the norms are replicated
    ("LKFA", 0.06),  # + MLA's latent down-projection, its norm and the shared rope key projection
])
def test_tp2_times_cp2_training_step_equals_one_process_and_halves_parameters(pattern, replicated_share):
    """4 ranks: TP groups of 2 inside CP groups of 2 (one run covers the TP math and TP x CP)."""
    results = run_world(tp_worker, 4, 2, 2, pattern, timeout=400, init_process_group=False)
    total = check(results, pattern)
    assert all(0.5 * total <= r["n_local"] <= (0.5 + replicated_share) * total for r in results), \
        (total, [r["n_local"] for r in results])


def test_mla_under_tp_splits_heads_and_replicates_the_latent():
    """What tensor parallelism splits in an MLA layer (its module doc says why): the per-head
    projections are shards, the latent's down-projection, norm and the shared rope key are whole;
    only the rope key's gradient is partial (marked for the sum over the TP group)."""
    from lctrain.parallel.tensor_parallel import TP_PARTIAL_GRAD, TP_SPLIT_DIM

    results = run_world(mla_split_worker, 2, timeout=200, init_process_group=False)
    m = tp_cfg("LKFA")
    H, D, R, r = m.attn_heads, m.attn_head_dim, m.mla_rope_dim, m.mla_kv_rank
    assert results[0] == {
        "q_proj.weight": ((H // 2 * (D + R), m.d_model), 0, False),
        "kv_down.weight": ((r, m.d_model), None, False),  # k_up / v_up sum the latent's gradient
        "kv_norm.weight": ((r,), None, False),
        "k_up.weight": ((H // 2 * D, r), 0, False),
        "v_up.weight": ((H // 2 * D, r), 0, False),
        "k_rope.weight": ((R, m.d_model), None, True),
        "o_proj.weight": ((m.d_model, H // 2 * D), 1, False),
    }, (results[0], TP_SPLIT_DIM, TP_PARTIAL_GRAD)


def mla_split_worker(rank, world):
    from lctrain.parallel import mesh
    from lctrain.parallel.tensor_parallel import TP_PARTIAL_GRAD, TP_SPLIT_DIM

    mesh.init_mesh({"tp": world, "cp": 1, "pp": 1}, "cpu")
    model = build(mesh.tp_group(), None, "LKFA")
    mixer = model.blocks[3].mixer
    return {n: (tuple(p.shape), getattr(p, TP_SPLIT_DIM, None), getattr(p, TP_PARTIAL_GRAD, False))
            for n, p in mixer.named_parameters()}


# ---------------------------------------------------------------- vocab-parallel loss in sequence chunks
CHUNK_PATTERN = "SA"
CHUNK_TOKENS = 7  # does not divide the 2 x 16 tokens: the last chunk is short


def chunk_cfg():
    m = tp_cfg()
    m.layer_pattern = CHUNK_PATTERN
    return m


def loss_and_grads(model, loss_chunk_tokens):
    """lm_loss (answer-style token weights included) + backward: (loss, mean, {name: grad})."""
    from lctrain.train.step import lm_loss

    model.zero_grad(set_to_none=True)
    input_ids, labels = sample(100)
    weights = torch.ones(labels.shape)
    weights[1, 4:9] = 20.0
    loss, mean = lm_loss(model, input_ids, labels, token_weights=weights, loss_chunk_tokens=loss_chunk_tokens)
    loss.backward()
    return loss.item(), mean.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def chunked_loss_worker(rank, world):
    from lctrain.models import build_model
    from lctrain.parallel import mesh
    from lctrain.parallel.tensor_parallel import full_state_dict

    mesh.init_mesh({"tp": world, "cp": 1, "pp": 1}, "cpu")
    torch.manual_seed(0)
    model = build_model(chunk_cfg(), tp_group=mesh.tp_group()).to(DTYPE)
    out = {}
    for chunk in (0, CHUNK_TOKENS):
        loss, mean, grads = loss_and_grads(model, chunk)
        out[chunk] = dict(loss=loss, mean=mean, grads=grads,
                          full_grads=full_state_dict(model, grads, mesh.tp_group()))
    return out


def test_tp2_vocab_parallel_loss_in_chunks_equals_unchunked_and_one_process():
    """train.loss_chunk_tokens under tp=2: the chunked vocab-parallel loss (logits [7, V/2] at a time)
    gives every rank the loss and the gradients (its shards) of the unchunked vocab-parallel loss, and
    gathered they equal the one-process chunked loss's."""
    from lctrain.models import build_model

    results = run_world(chunked_loss_worker, 2, timeout=300, init_process_group=False)
    torch.manual_seed(0)
    ref_loss, ref_mean, ref_grads = loss_and_grads(build_model(chunk_cfg()).to(DTYPE), CHUNK_TOKENS)
    for rank, res in enumerate(results):
        plain, chunked = res[0], res[CHUNK_TOKENS]
        for got in (chunked, plain):
            assert got["loss"] == pytest.approx(ref_loss, rel=RTOL), (rank, got["loss"], ref_loss)
            assert got["mean"] == pytest.approx(ref_mean, rel=RTOL), (rank, got["mean"], ref_mean)
        assert set(chunked["grads"]) == set(plain["grads"])
        for name, g in chunked["grads"].items():
            assert _rel(g, plain["grads"][name]) <= GRAD_RTOL, \
                f"rank {rank}: chunked gradient of {name} differs from the unchunked by {_rel(g, plain['grads'][name]):.2e}"
        for name, ref in ref_grads.items():
            got = chunked["full_grads"][name]
            assert _rel(got, ref) <= RTOL, f"rank {rank}: gathered {name} differs by {_rel(got, ref):.2e}"
    # the head is split: each rank's chunked gradient of the tied embedding is its vocabulary half
    assert results[0][CHUNK_TOKENS]["grads"]["embed.weight"].shape[0] == chunk_cfg().vocab_size // 2
