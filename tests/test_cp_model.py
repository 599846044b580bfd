"""A whole training step of a tiny hybrid model under context parallelism equals the one-process step.

The mesh comes from megatron-core (init_mesh with parallel.cp / data parallel from the world size);
each CP rank takes its contiguous slice of the same (seq_len + 1)-token sample; loss through
lm_loss, gradients summed over the dp x cp group by the training loop's reduce_gradients, then one
SGD step. Compared with the same step on one process over the full sequence: the loss, every
parameter gradient and every updated parameter. Layers: gated DeltaNet, sliding-window attention
(halo), DeltaNet, Mamba-2 (context_parallel + conv halos) and global attention (Ulysses), with packed
documents kept apart in every layer; activation checkpointing none, full and selective (where replays must
reuse the gathered states: one all-gather per layer and row), the last also with the chunked cross-entropy
(train.loss_chunk_tokens) under CP.
"""
from __future__ import annotations

import torch
from dist_utils import run_world

PATTERN = "GSDMA"
SEQ_LEN = 16
# float64 models: the comparison then measures the method, not float32 rounding (which reaches
# ~1e-4 relative on small reduced gradients such as Mamba-2's D); lm_loss's float32 logits bound it.
DTYPE = torch.float64
RTOL = 2e-6


def tiny_model_cfg(checkpointing: str):
    from lctrain.config import default_config

    m = default_config().model
    m.vocab_size, m.d_model, m.layer_pattern = 64, 32, PATTERN
    m.n_heads, m.head_dim, m.attn_heads, m.attn_head_dim = 2, 8, 2, 8
    m.window, m.conv_size, m.mlp_ratio, m.chunk_size = 5, 3, 2.0, 4
    m.kernel_backend = "torch"
    m.activation_checkpointing = checkpointing
    m.document_end_id = 63  # packed documents in every layer (see sample)
    return m


def sample(seed: int):
    """(input_ids, labels) of one (seq_len + 1)-token sample, batch of 2, some labels ignored; packed
    documents (token 63 ends one) crossing the CP shard edges, different in each row."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 63, (2, SEQ_LEN + 1), generator=gen)
    tokens[0, [2, 6]] = 63
    tokens[1, 9] = 63
    labels = tokens[:, 1:].clone()
    labels[0, 3] = labels[1, SEQ_LEN - 2] = -100
    return tokens[:, :-1], labels


def one_step(model, batches, *, cp_group=None, cp_rank=0, cp_size=1, grad_group=None, dp_size=1, loss_chunk_tokens=0,
             tp_group=None):
    """lm_loss + backward per batch, gradient reduction, SGD step; returns (mean loss, grads, params)."""
    from lctrain.train.grad_comm import reduce_gradients
    from lctrain.train.step import lm_loss

    params = list(model.parameters())
    # SGD: its update is linear in the gradient (Adam's first step ~ sign(g) would amplify rounding)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    means = []
    for input_ids, labels in batches:
        Tl = input_ids.shape[1] // cp_size
        sl = slice(cp_rank * Tl, (cp_rank + 1) * Tl)
        loss, mean = lm_loss(model, input_ids[:, sl], labels[:, sl], cp_group=cp_group, position_offset=cp_rank * Tl,
                             loss_chunk_tokens=loss_chunk_tokens)
        (loss / len(batches)).backward()
        means.append(mean.item())
    reduce_gradients(params, grad_group, dp_size, tp_group)
    grads = [p.grad.detach().clone() for p in params]
    opt.step()
    return sum(means) / len(means), grads, [p.detach().clone() for p in params]


def model_worker(rank, world, cp, checkpoint_modes):
    from lctrain.parallel import mesh

    mesh.init_mesh({"cp": cp, "tp": 1, "pp": 1}, "cpu")
    assert (mesh.cp_size(), mesh.dp_size()) == (cp, world // cp), (mesh.cp_size(), mesh.dp_size())
    out = []
    for checkpointing, loss_chunk in checkpoint_modes:
        model = build(checkpointing, cp_group=mesh.cp_group())
        batch = sample(100 + mesh.dp_rank())
        loss, grads, params = one_step(model, [batch], cp_group=mesh.cp_group(), cp_rank=mesh.cp_rank(), cp_size=cp,
                                       grad_group=mesh.dp_cp_group(), dp_size=mesh.dp_size(),
                                       loss_chunk_tokens=loss_chunk)
        counts = [(b.kind, op.gathers, op.replays_reused) for b in model.blocks if hasattr(b.mixer, "cp_ops")
                  for op in b.mixer.cp_ops()]
        out.append(dict(checkpointing=(checkpointing, loss_chunk), loss=loss, grads=grads,
                        params=params, counts=counts))
    return out


def build(checkpointing: str, cp_group=None):
    from lctrain.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_model_cfg(checkpointing), cp_group=cp_group).to(DTYPE)


def _rel(got, ref):
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def check(results, dp: int):
    """Every rank's step against the one-process step over the dp replicas' full samples."""
    refs = {}
    names = [n for n, _ in build("none").named_parameters()]
    for rank, rank_results in enumerate(results):
        for res in rank_results:
            ckpt, loss_chunk = res["checkpointing"]
            if (ckpt, loss_chunk) not in refs:  # one process: the replicas' samples as gradient accumulation
                refs[ckpt, loss_chunk] = one_step(build(ckpt), [sample(100 + d) for d in range(dp)],
                                                  loss_chunk_tokens=loss_chunk)
            ref_loss, ref_grads, ref_params = refs[ckpt, loss_chunk]
            where = f"rank {rank}, checkpointing={ckpt}"
            if dp == 1:  # lm_loss's mean_loss is the full-sequence mean on every CP rank
                assert abs(res["loss"] - ref_loss) <= RTOL * abs(ref_loss), (where, res["loss"], ref_loss)
            for name, got, ref in zip(names, res["grads"], ref_grads):
                assert _rel(got, ref) <= RTOL, f"{where}: gradient of {name} differs by {_rel(got, ref):.2e}"
            for name, got, ref in zip(names, res["params"], ref_params):
                assert _rel(got, ref) <= RTOL, f"{where}: updated {name} differs by {_rel(got, ref):.2e}"
            # one state all-gather per linear layer and batch row (packed documents run row by row)
            # per step; under checkpointing the replay reuses it
            assert len(res["counts"]) == 3 * 2, res["counts"]
            checkpointed = {"none": "", "full": "GDM"}.get(ckpt, ckpt.partition(":")[2])
            assert all((g, r) == (1, int(kind in checkpointed)) for kind, g, r in res["counts"]), (where, res["counts"])


def test_cp2_training_step_equals_one_process_with_and_without_checkpointing():
    # against the one-process step of the same mode and loss chunking (chunked vs plain loss: test_long_context.py)
    modes = (("none", 0), ("full", 0), ("selective:GSM", 5))
    check(run_world(model_worker, 2, 2, modes, timeout=300, init_process_group=False), dp=1)


def test_cp2_times_dp2_training_step_equals_one_process():
    check(run_world(model_worker, 4, 2, (("full", 0),), timeout=300, init_process_group=False), dp=2)


# the default transition ("auto") on the Triton backend at CP = 2 is "pipeline": the linear layers of a float32
# model through the Triton interpreter (chunks of 64: one per rank), no documents, full checkpointing
TRITON_SEQ = 128


def triton_model(cp_group=None):
    from lctrain.models import build_model

    m = tiny_model_cfg("full")
    m.layer_pattern, m.chunk_size, m.kernel_backend, m.document_end_id = "GDM", 64, "triton", None
    torch.manual_seed(0)
    return build_model(m, cp_group=cp_group).to(torch.float32)


def triton_sample():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 64, (1, TRITON_SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def pipeline_default_worker(rank, world):
    import importlib

    from lctrain.parallel import mesh

    mesh.init_mesh({"cp": world, "tp": 1, "pp": 1}, "cpu")
    cpm = importlib.import_module("lctrain.parallel.context_parallel")
    passes = []  # the separate state passes of "sequential": "pipeline" runs none of them
    for name in ("shard_transition", "shard_final_state", "shard_state_grad"):
        fn = getattr(cpm, name)
        setattr(cpm, name, lambda *a, _fn=fn, _name=name, **kw: passes.append(_name) or _fn(*a, **kw))
    model = triton_model(mesh.cp_group())
    loss, grads, params = one_step(model, [triton_sample()], cp_group=mesh.cp_group(), cp_rank=mesh.cp_rank(),
                                   cp_size=world, grad_group=mesh.dp_cp_group())
    ops = [op for b in model.blocks if hasattr(b.mixer, "cp_ops") for op in b.mixer.cp_ops()]
    return dict(loss=loss, grads=grads, params=params, passes=passes,
                ops=[(op.transition, op.resolved_transition("triton", torch.device("cpu")), op.gathers,
                      op.replays_reused) for op in ops])


def test_cp2_default_transition_is_pipeline_on_triton_and_exact():
    """A training step (full checkpointing) of a float32 G/D/M model on the Triton backend under CP = 2 with the
    default transition: every CP op runs "pipeline" (no separate state pass, one all-gather per forward, the
    checkpoint replay reusing it), and the loss, gradients and updated parameters equal the one-process step."""
    ref_loss, ref_grads, ref_params = one_step(triton_model(), [triton_sample()])
    names = [n for n, _ in triton_model().named_parameters()]
    for rank, res in enumerate(run_world(pipeline_default_worker, 2, timeout=600, init_process_group=False)):
        assert res["ops"] == [("auto", "pipeline", 1, 1)] * 3, (rank, res["ops"])
        assert res["passes"] == [], (rank, res["passes"])
        assert abs(res["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (rank, res["loss"], ref_loss)
        for what, got_all, ref_all in (("gradient", res["grads"], ref_grads), ("updated", res["params"], ref_params)):
            for name, got, ref in zip(names, got_all, ref_all):
                assert _rel(got, ref) <= 2e-4, f"rank {rank}: {what} {name} differs by {_rel(got, ref):.2e}"
