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


# the two models of the tp=2 x cp=2 step: (layer pattern, MLA on its "A" layer); together every layer kind
MODELS = (("GSDMA", False), ("LKFA", True))


def tp_cfg(pattern: str = "GSDMA", mla: bool = False):
    m = tiny_model_cfg("none")
    m.n_heads, m.attn_heads = 4, 4  # 2 heads per TP rank, 1 per TP x CP rank under Ulysses
    m.layer_pattern = pattern
    if any(c in "LK" for c in pattern):
        m.loglinear_levels = 5  # reaches position 15 (SEQ_LEN 16)
        m.document_end_id = None  # the log-linear layers take no packed documents under CP
    if mla:
        m.mla_kv_rank, m.mla_rope_dim, m.attn_conv_size = 6, 4, 0
    return m


def build(tp_group=None, cp_group=None, pattern: str = "GSDMA", mla: bool = False, sequence_parallel: bool = False):
    from lctrain.models import build_model

    torch.manual_seed(0)
    return build_model(tp_cfg(pattern, mla), cp_group=cp_group, tp_group=tp_group,
                       sequence_parallel=sequence_parallel).to(DTYPE)


def tp_worker(rank, world, tp, cp, sequence_parallel=False):
    """One step of each of MODELS in one tp x cp world (one start-up for both); also the sequence length
    of every block's input (the residual stream: 1/tp of the rank's shard under sequence parallelism)."""
    from lctrain.parallel import mesh
    from lctrain.parallel.tensor_parallel import full_state_dict

    mesh.init_mesh({"tp": tp, "cp": cp, "pp": 1}, "cpu")
    tp_group = mesh.tp_group()
    out = {}
    for pattern, mla in MODELS:
        model = build(tp_group, mesh.cp_group(), pattern, mla, sequence_parallel)
        block_lens = []
        for block in model.blocks:
            block.register_forward_pre_hook(lambda mod, args, lens=block_lens: lens.append(args[0].shape[1]))
        init = {k: v.clone() for k, v in full_state_dict(model, model.state_dict(), tp_group).items()}
        n_local = model.num_parameters()
        names = [n for n, _ in model.named_parameters()]
        loss, grads, params = one_step(model, [sample(100)], cp_group=mesh.cp_group(), cp_rank=mesh.cp_rank(),
                                       cp_size=cp, grad_group=mesh.dp_cp_group(), dp_size=mesh.dp_size(),
                                       tp_group=tp_group)
        out[pattern] = dict(loss=loss, n_local=n_local, init=init,
                            grads=full_state_dict(model, dict(zip(names, grads)), tp_group),
                            params=full_state_dict(model, dict(zip(names, params)), tp_group),
                            block_lens=sorted(set(block_lens)))
    return out


def check(results, pattern: str, mla: bool):
    ref_model = build(pattern=pattern, mla=mla)
    ref_init = {k: v.clone() for k, v in ref_model.state_dict().items()}
    names = [n for n, _ in ref_model.named_parameters()]
    ref_loss, ref_grads, ref_params = one_step(ref_model, [sample(100)])
    for rank, res in enumerate(results):
        assert abs(res["loss"] - ref_loss) <= RTOL * abs(ref_loss), (pattern, rank, res["loss"], ref_loss)
        assert set(res["init"]) == set(ref_init)
        for name, ref in ref_init.items():
            assert torch.equal(res["init"][name], ref), \
                f"{pattern}, rank {rank}: initial {name} differs from the one-process model"
        for name, ref_g, ref_p in zip(names, ref_grads, ref_params):
            assert _rel(res["grads"][name], ref_g) <= GRAD_RTOL, \
                f"{pattern}, rank {rank}: gradient of {name} differs by {_rel(res['grads'][name], ref_g):.2e}"
            assert _rel(res["params"][name], ref_p) <= GRAD_RTOL, f"{pattern}, rank {rank}: updated {name} differs"
    return ref_model.num_parameters()


@pytest.mark.slow
def test_tp2_times_cp2_training_step_equals_one_process_and_halves_parameters():
    """4 ranks: TP groups of 2 inside CP groups of 2 (one run covers the TP math and TP x CP), for a
    model of G, S, D, M, A layers and one of L, K, F and an MLA global layer."""
    results = run_world(tp_worker, 4, 2, 2, timeout=500, init_process_group=False)
    # GSDMA: every weight matrix and the (tied) embedding are split, only the norms replicated; LKFA
    # also replicates MLA's latent down-projection, its norm and the shared rope key projection
    for (pattern, mla), replicated_share in zip(MODELS, (0.02, 0.06)):
        total = check([res[pattern] for res in results], pattern, mla)
        n_local = [res[pattern]["n_local"] for res in results]
        assert all(0.5 * total <= n <= (0.5 + replicated_share) * total for n in n_local), (pattern, total, n_local)


# ---------------------------------------------------------------- vocab-parallel loss in sequence chunks
CHUNK_PATTERN = "SA"  # its global layer is MLA: the test also reads an MLA layer's TP roles
CHUNK_TOKENS = 7  # does not divide the 2 x 16 tokens: the last chunk is short


def chunk_cfg():
    return tp_cfg(CHUNK_PATTERN, mla=True)


def loss_and_grads(model, loss_chunk_tokens, tp_group=None):
    """lm_loss (answer-style token weights included) + backward, partial TP gradients summed as the
    trainer sums them: (loss, mean, {name: grad})."""
    from lctrain.parallel.tensor_parallel import reduce_partial_grads

    from lctrain.train.step import lm_loss

    model.zero_grad(set_to_none=True)
    input_ids, labels = sample(100)
    weights = torch.ones(labels.shape)
    weights[1, 4:9] = 20.0
    loss, mean = lm_loss(model, input_ids, labels, token_weights=weights, loss_chunk_tokens=loss_chunk_tokens)
    loss.backward()
    reduce_partial_grads(list(model.parameters()), tp_group)
    return loss.item(), mean.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def chunked_loss_worker(rank, world):
    from lctrain.parallel import mesh
    from lctrain.parallel.tensor_parallel import TP_PARTIAL_GRAD, TP_SPLIT_DIM, full_state_dict

    from lctrain.models import build_model

    mesh.init_mesh({"tp": world, "cp": 1, "pp": 1}, "cpu")
    torch.manual_seed(0)
    model = build_model(chunk_cfg(), tp_group=mesh.tp_group()).to(DTYPE)
    out = {}
    for chunk in (0, CHUNK_TOKENS):
        loss, mean, grads = loss_and_grads(model, chunk, mesh.tp_group())
        out[chunk] = dict(loss=loss, mean=mean, grads=grads,
                          full_grads=full_state_dict(model, grads, mesh.tp_group()))
    out["mla"] = {n: (tuple(p.shape), getattr(p, TP_SPLIT_DIM, None), getattr(p, TP_PARTIAL_GRAD, False))
                  for n, p in model.blocks[1].mixer.named_parameters()}
    return out


def test_tp2_vocab_parallel_loss_in_chunks_equals_unchunked_and_one_process():
    """train.loss_chunk_tokens under tp=2: the chunked vocab-parallel loss (logits [7, V/2] at a time)
    gives every rank the loss and the gradients (its shards) of the unchunked vocab-parallel loss, and
    gathered they equal the one-process chunked loss's. Also: which MLA parameters are split."""
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
            err = _rel(g, plain["grads"][name])
            assert err <= GRAD_RTOL, f"rank {rank}: chunked gradient of {name} differs from the unchunked by {err:.2e}"
        for name, ref in ref_grads.items():
            got = chunked["full_grads"][name]
            assert _rel(got, ref) <= RTOL, f"rank {rank}: gathered {name} differs by {_rel(got, ref):.2e}"
    # the head is split: each rank's chunked gradient of the tied embedding is its vocabulary half
    assert results[0][CHUNK_TOKENS]["grads"]["embed.weight"].shape[0] == chunk_cfg().vocab_size // 2
    # what tensor parallelism splits in an MLA layer (its module doc says why): the per-head projections
    # are shards; the latent's down-projection, its norm and the shared rope key are whole, and only the
    # rope key's gradient is partial (k_up / v_up, column-parallel, sum the latent's gradient themselves)
    m = chunk_cfg()
    H, D, R, r = m.attn_heads, m.attn_head_dim, m.mla_rope_dim, m.mla_kv_rank
    assert results[0]["mla"] == {
        "q_proj.weight": ((H // 2 * (D + R), m.d_model), 0, False),
        "kv_down.weight": ((r, m.d_model), None, False),
        "kv_norm.weight": ((r,), None, False),
        "k_up.weight": ((H // 2 * D, r), 0, False),
        "v_up.weight": ((H // 2 * D, r), 0, False),
        "k_rope.weight": ((R, m.d_model), None, True),
        "o_proj.weight": ((m.d_model, H // 2 * D), 1, False),
    }, results[0]["mla"]
