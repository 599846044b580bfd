"""Sequence parallelism (parallel.sequence_parallel) equals the one-process model exactly.

Under tp=2 with sequence parallelism the residual stream between blocks holds half of the sequence
per rank (checked on every block's input), and a training step of the tiny models with every layer
kind (G, S, D, M, A; L, K, F and an MLA global layer) gives the one-process loss, and every gradient
and updated parameter gathered over TP equals the one-process step's: alone, inside CP groups
(tp=2 x cp=2, 4 ranks) and across pipeline stages (tp=2 x pp=2). The chunked loss
(train.loss_chunk_tokens) gathers the sequence as the plain head does; decoding with a cache (whole
sequence) gives the one-process logits. Refusals: parallel.tp=1, a sequence that does not split over tp.
"""
from __future__ import annotations

import pytest
import torch
from dist_utils import run_world
from test_cp_model import RTOL, SEQ_LEN, sample
from test_tp_model import MODELS, check, chunk_cfg, loss_and_grads, tp_worker


def _check_all(results, tp: int, cp: int):
    for pattern, mla in MODELS:
        check([res[pattern] for res in results], pattern, mla)
        for res in results:
            assert res[pattern]["block_lens"] == [SEQ_LEN // cp // tp], (pattern, res[pattern]["block_lens"])


def test_tp2_sequence_parallel_training_step_equals_one_process():
    _check_all(run_world(tp_worker, 2, 2, 1, True, timeout=300, init_process_group=False), tp=2, cp=1)


@pytest.mark.slow
def test_tp2_times_cp2_sequence_parallel_training_step_equals_one_process():
    """The sequence is split by CP first, then each CP shard over its TP group."""
    _check_all(run_world(tp_worker, 4, 2, 2, True, timeout=500, init_process_group=False), tp=2, cp=2)


def chunked_sp_worker(rank, world):
    from lctrain.parallel import mesh
    from lctrain.parallel.tensor_parallel import full_state_dict

    from lctrain.models import build_model

    mesh.init_mesh({"tp": world, "cp": 1, "pp": 1}, "cpu")
    torch.manual_seed(0)
    model = build_model(chunk_cfg(), tp_group=mesh.tp_group(), sequence_parallel=True).to(torch.float64)
    loss, mean, grads = loss_and_grads(model, 7, mesh.tp_group())
    return dict(loss=loss, mean=mean, grads=full_state_dict(model, grads, mesh.tp_group()),
                decoded=_decode(model, mesh.tp_group()))


def _decode(model, tp_group=None):
    """Logits of a 5-token prefill and one decoding step (vocabulary gathered over TP): decoding runs on
    the whole sequence, the row-parallel partial sums all-reduced."""
    from lctrain.parallel.tensor_parallel import gather_full

    ids = sample(3)[0].clone()
    ids[ids == 63] = 1  # one document per prompt (decoding refuses document ends)
    with torch.no_grad():
        cache = model.new_cache(ids.shape[0])
        return [gather_full(model(ids[:, :5], cache=cache), -1, tp_group),
                gather_full(model(ids[:, 5:6], cache=cache), -1, tp_group)]


def test_tp2_sequence_parallel_chunked_loss_and_decoding_equal_one_process():
    from test_cp_model import _rel

    from lctrain.models import build_model

    results = run_world(chunked_sp_worker, 2, timeout=300, init_process_group=False)
    torch.manual_seed(0)
    ref_model = build_model(chunk_cfg()).to(torch.float64)
    ref_loss, ref_mean, ref_grads = loss_and_grads(ref_model, 7)
    ref_decoded = _decode(ref_model)
    for rank, res in enumerate(results):
        for got, ref in zip(res["decoded"], ref_decoded):
            assert _rel(got, ref) <= RTOL, f"rank {rank}: decoding logits differ"
        assert res["loss"] == pytest.approx(ref_loss, rel=RTOL) and res["mean"] == pytest.approx(ref_mean, rel=RTOL)
        for name, ref in ref_grads.items():
            assert _rel(res["grads"][name], ref) <= RTOL, f"rank {rank}: gathered {name} differs"


def test_sequence_parallel_refusals():
    from lctrain.config import ConfigError, load_config, validate
    from lctrain.models import build_model

    with pytest.raises(ValueError, match="parallel.sequence_parallel"):
        build_model(chunk_cfg(), sequence_parallel=True)
    base = ["model.layer_pattern=GA", "parallel.sequence_parallel=true"]
    with pytest.raises(ConfigError, match="parallel.sequence_parallel"):
        validate(load_config(None, base + ["parallel.tp=1"]))
    with pytest.raises(ConfigError, match="data.seq_len"):
        validate(load_config(None, base + ["parallel.tp=2", "parallel.cp=2", "data.seq_len=258"]))
    validate(load_config(None, base + ["parallel.tp=2", "parallel.cp=2", "data.seq_len=256"]))


@pytest.mark.slow
def test_tp2_pp2_sequence_parallel_step_equals_one_process():
    """Pipeline stages pass the TP rank's sequence slice [B, T / tp, d] (tp=2 x pp=2, 4 ranks)."""
    from test_pp import check, pp_worker

    cases = [((2, 1, 2), ["model.tie_embeddings=false", "parallel.sequence_parallel=true"], torch.float64)]
    results = run_world(pp_worker, 4, cases, timeout=400)
    check(*cases[0], [per_rank[0] for per_rank in results])
