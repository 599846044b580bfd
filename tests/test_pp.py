"""Pipeline parallelism (megatron-core's 1F1B schedule on gloo) equals the one-process run.

In-process worlds: the Trainer of every rank takes one step's two micro-batches through the
pipeline for (tp, cp, pp) = (1, 1, 2), (1, 2, 2) and (2, 1, 2); the loss every rank reports, the
gradient norm, every initial parameter and every (clipped) gradient, gathered over TP and over the
stages by name, equal the one-process Trainer's. pp=2 alone in float32; with CP or TP the model
runs in float64 as in test_cp_model / test_tp_model (float32 CP sums Mamba-2's ~1e-6 D gradient in
another order: 2e-4 relative, which is CP's rounding, not the pipeline's). Through the CLI (in
test_train.py): cp=2 x pp=2 logs the one-process losses and its checkpoint resumes with pp=1; the
tp=2 x cp=2 checkpoint resumes with pp=2. Bad layouts are refused before any work.
"""
from __future__ import annotations

import pytest
import torch
from dist_utils import run_world
from test_cp_model import _rel

from lctrain.config import ConfigError, load_config

MODEL = ["model.d_model=32", "model.layer_pattern=GSMA", "model.n_heads=4", "model.head_dim=8", "model.attn_heads=4",
         "model.attn_head_dim=8", "model.window=16", "model.chunk_size=16", "data.seq_len=32",
         "data.micro_batch_size=2", "train.grad_accum=2", "train.progress=false", "train.tensorboard=false"]
LOSS_RTOL = 1e-5  # the bar (float32)
# tp=2 sums the vocab-parallel cross-entropy in another order (test_tp_model.GRAD_RTOL says why)
GRAD_RTOL = {1: 1e-5, 2: 2e-4}


def batches(cp: int = 1, cp_rank: int = 0) -> list[dict]:
    """Two seeded micro-batches (with a document end in each row), this CP rank's contiguous shard."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(2):
        tokens = torch.randint(0, 256, (2, 33), generator=gen)
        tokens[:, 11] = 257
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        shard = 32 // cp
        out.append({"input_ids": ids[:, cp_rank * shard:(cp_rank + 1) * shard].contiguous(),
                    "labels": labels[:, cp_rank * shard:(cp_rank + 1) * shard].contiguous()})
    return out


def one_step(trainer, cp: int, cp_rank: int, dtype: torch.dtype) -> dict:
    """One step's forward, backward and gradient finish; full tensors by parameter name."""
    from lctrain.parallel.tensor_parallel import full_state_dict

    trainer.model.to(dtype)  # in place: the optimizer's parameters stay the model's

    named = dict(trainer.model.named_parameters())
    init = full_state_dict(trainer.model, {k: p.detach().clone() for k, p in named.items()}, trainer.tp_group)
    loss = float(trainer.forward_backward(batches(cp, cp_rank)))
    norm = float(trainer.finish_gradients())
    grads = full_state_dict(trainer.model, {k: p.grad.clone() for k, p in named.items()}, trainer.tp_group)
    return dict(loss=loss, norm=norm, init=init, grads=grads)


def pp_worker(rank, world, cases):
    """Each case's step on this world (one mesh after the other: the processes start once)."""
    from lctrain.parallel import mesh

    from lctrain.train.trainer import Trainer

    out = []
    for (tp, cp, pp), extra, dtype in cases:
        cfg = load_config(None, [*MODEL, *extra, f"parallel.tp={tp}", f"parallel.cp={cp}", f"parallel.pp={pp}"])
        mesh.init_mesh(cfg.parallel, "cpu")
        trainer = Trainer(cfg, torch.device("cpu"), data=False)
        res = one_step(trainer, cp, mesh.cp_rank(), dtype)
        res["stage"], res["blocks"] = mesh.pp_rank(), [trainer.model.blocks.first + i
                                                       for i in range(len(trainer.model.blocks))]
        out.append(res)
        mesh.destroy_mesh()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world, cases", [
    (2, [((1, 1, 2), [], torch.float32)]),
    (4, [((1, 2, 2), [], torch.float64), ((2, 1, 2), ["model.tie_embeddings=false"], torch.float64)]),
])
def test_pipeline_step_equals_one_process(world, cases):
    results = run_world(pp_worker, world, cases, timeout=400)  # the world outlives each case's mesh
    for i, (layout, extra, dtype) in enumerate(cases):
        check(layout, extra, dtype, [per_rank[i] for per_rank in results])


def check(layout, extra, dtype, results):
    from lctrain.train.trainer import Trainer

    model_extra = [e for e in extra if not e.startswith("parallel.")]  # the one-process run takes no parallel.*
    ref = one_step(Trainer(load_config(None, [*MODEL, *model_extra]), torch.device("cpu"), data=False), 1, 0, dtype)
    seen = {}
    for rank, res in enumerate(results):
        assert res["blocks"] == list(range(2 * res["stage"], 2 * res["stage"] + 2)), (rank, res["blocks"])
        assert abs(res["loss"] - ref["loss"]) <= LOSS_RTOL * abs(ref["loss"]), (rank, res["loss"], ref["loss"])
        assert abs(res["norm"] - ref["norm"]) <= GRAD_RTOL[layout[0]] * ref["norm"], (rank, res["norm"], ref["norm"])
        for name, grad in res["grads"].items():
            assert torch.equal(res["init"][name], ref["init"][name]), f"rank {rank}: initial {name} differs"
            err = _rel(grad, ref["grads"][name])
            assert err <= GRAD_RTOL[layout[0]], f"rank {rank}, stage {res['stage']}: {name}'s gradient off by {err:.2e}"
            seen.setdefault(name, set()).add(res["stage"])
    assert set(seen) == set(ref["grads"])  # the stages together hold every parameter, each block on its stage
    assert all(stages == {int(name.split(".")[1]) // 2} for name, stages in seen.items() if name.startswith("blocks."))
    # the tied table: the embedding on stage 0, the head's copy on stage 1; untied, each on its own
    assert seen["embed.weight"] == ({0} if model_extra else {0, 1}) and seen["norm.weight"] == {1}


def test_stage_layers_and_bad_pipeline_layouts_refused():
    from lctrain.parallel.pipeline import stage_layers

    assert [list(stage_layers(6, 3, s)) for s in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="parallel.pp"):
        stage_layers(3, 2, 0)
    for bad, key in [(["model.layer_pattern=GS", "parallel.pp=3"], "parallel.pp"),  # fewer layers than stages
                     (["model.layer_pattern=GSG", "parallel.pp=2"], "parallel.pp"),  # no equal split
                     (["parallel.pp=2", "parallel.nproc_per_node=3"], "parallel.nproc_per_node"),
                     (["parallel.pp=2", "parallel.nproc_per_node=4"], "parallel.pp"),  # pp x data parallelism
                     (["parallel.pp=2", "train.dtype=float16"], "train.dtype")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, bad)
    load_config(None, ["parallel.pp=2", "parallel.cp=2", "parallel.tp=2"])  # the default 4 layers split in two
