"""ZeRO-1 (train.shard_optimizer): the Adam state sharded over the data-parallel replicas trains
exactly as the replicated optimizer, and its checkpoints resume either way.

Two gloo ranks, data parallel, the Trainer fed seeded batches (no loader): three steps replicated;
two steps sharded, save, a third step; then an unsharded Trainer resumes that checkpoint and takes
the third step. Losses and parameters must be the same bit for bit (AdamW's update is elementwise,
so it does not matter which replica computes it), and each replica must hold only part of the state.
"""
from __future__ import annotations

import torch
from dist_utils import run_world

TINY = ["model.d_model=32", "model.layer_pattern=GS", "model.n_heads=2", "model.head_dim=16", "model.attn_heads=2",
        "model.attn_head_dim=16", "model.window=16", "model.chunk_size=16", "data.seq_len=32",
        "data.micro_batch_size=2",
        "train.steps=3", "train.warmup_steps=1", "train.progress=false", "train.tensorboard=false", "train.lr=1e-2"]


def _batches(dp_rank: int, vocab: int):
    g = torch.Generator().manual_seed(100 + dp_rank)
    ids = torch.randint(0, vocab, (3, 2, 33), generator=g)
    return [[{"input_ids": x[:, :-1], "labels": x[:, 1:]}] for x in ids]


def zero_worker(rank, world, out_dir):
    from lctrain.parallel import mesh

    from lctrain.config import load_config
    from lctrain.train.trainer import Trainer

    cpu = torch.device("cpu")
    base = load_config(None, [*TINY, f"train.out_dir={out_dir}"])
    sharded = load_config(None, [*TINY, f"train.out_dir={out_dir}", "train.shard_optimizer=true"])
    mesh.init_mesh(base.parallel, "cpu")
    batches = _batches(mesh.dp_rank(), base.model.vocab_size)

    plain = Trainer(base, cpu, data=False)
    plain_losses = [plain.step(b).loss for b in batches]

    zero = Trainer(sharded, cpu, data=False)
    zero_losses = [zero.step(b).loss for b in batches[:2]]
    held, total = len(zero.optimizer.optim.state), len(zero.params)
    ckpt = zero.save()
    zero_losses.append(zero.step(batches[2]).loss)
    same_params = all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), zero.model.parameters()))

    resumed = Trainer(base, cpu, data=False)
    resumed.load(ckpt)
    resumed_loss = resumed.step(batches[2]).loss
    same_resumed = all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), resumed.model.parameters()))
    return dict(plain=plain_losses, zero=zero_losses, resumed=resumed_loss, held=held, total=total,
                same_params=same_params, same_resumed=same_resumed)


def test_zero1_equals_replicated_adam_and_resumes_unsharded(tmp_path):
    results = run_world(zero_worker, 2, str(tmp_path / "run"), timeout=300, init_process_group=False)
    for rank, r in enumerate(results):
        assert r["zero"] == r["plain"], (rank, r)
        assert r["resumed"] == r["plain"][2], (rank, r)
        assert r["same_params"] and r["same_resumed"], (rank, r)
        assert 0 < r["held"] < r["total"], (rank, r["held"], r["total"])
    assert sum(r["held"] for r in results) == results[0]["total"]  # every parameter's state on exactly one replica
