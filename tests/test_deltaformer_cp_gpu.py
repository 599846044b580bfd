"""Deltaformer context parallelism on 2 GPUs with NCCL (`python -m pytest -m gpu tests/test_deltaformer_cp_gpu.py`).

One process per GPU (rank r on cuda:r). Both schedules, Triton chunk passes, bf16 inputs: each
rank's output and the gradients of q, k, v, beta must equal one GPU's float32 torch backend on the
whole sequence (relative error of the norm <= 2e-2). The pipeline streams its u / finished rows with
NCCL point-to-point sends in pieces of 256 tokens (4 pieces per rank); "pipeline+docs" packs three
documents, one across the shard boundary (cu_seqlens on the one-GPU side).
"""
from __future__ import annotations

import functools
from datetime import timedelta

import pytest
import torch
from dist_utils import run_world

P = 2
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < P,
                                 reason=f"needs {P} CUDA GPUs")]
TOL = 2e-2
B, TL, H, D = 1, 1024, 4, 128
SCHEDULES = ("pipeline", "gather", "pipeline+docs")
CUTS = [0, TL // 3, TL + TL // 5, P * TL]       # document boundaries of the docs case


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def gpu_worker(rank, world_size):
    import torch.distributed as dist
    from lctrain.kernels import deltaformer
    from lctrain.parallel.deltaformer_cp import deltaformer_cp
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=300), device_id=device)
    gen = torch.Generator(device=device).manual_seed(19)
    T = P * TL
    x = {n: torch.randn(B, T, H, D, generator=gen, device=device) for n in ("q", "k", "v", "do")}
    x["beta"] = torch.sigmoid(torch.randn(B, T, H, generator=gen, device=device))
    names = ("q", "k", "v", "beta")
    sl = slice(rank * TL, (rank + 1) * TL)
    docs = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, c in enumerate(CUTS[1:-1]):
        docs[:, c:] = i + 1
    out = {}
    for sched in SCHEDULES:
        with_docs = sched.endswith("+docs")
        ref = {n: x[n].clone().requires_grad_() for n in names}
        o_ref = deltaformer(*ref.values(), backend="torch", chunk_size=64,
                            cu_seqlens=torch.tensor(CUTS, device=device) if with_docs else None)
        (o_ref * x["do"]).sum().backward()
        loc = {n: x[n][:, sl].to(torch.bfloat16).requires_grad_() for n in names}
        o = deltaformer_cp(*loc.values(), dist.group.WORLD, backend="triton", chunk_size=128,
                           schedule=sched.removesuffix("+docs"), piece_size=None if sched == "gather" else 256,
                           doc_ids=docs[:, sl] if with_docs else None)
        (o.float() * x["do"][:, sl]).sum().backward()
        out[sched] = {"o": rel(o, o_ref[:, sl]), **{f"d{n}": rel(loc[n].grad, ref[n].grad[:, sl]) for n in names}}
    dist.destroy_process_group()
    return out


@functools.lru_cache(maxsize=None)
def world():
    return run_world(gpu_worker, P, timeout=900, init_process_group=False)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_deltaformer_cp_on_two_gpus(schedule):
    for rank, res in enumerate(world()):
        bad = {k: e for k, e in res[schedule].items() if not e <= TOL}
        assert not bad, f"{schedule} rank {rank}: relative errors above {TOL}: {bad}"
