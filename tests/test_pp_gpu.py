"""Pipeline parallelism on 2 GPUs with NCCL (`python -m pytest -m gpu tests/test_pp_gpu.py`).

The CPU tests (tests/test_pp.py) run megatron-core's schedule on gloo with non-batched P2P; here
`lctrain train parallel.pp=2` runs it as on a cluster: NCCL, batched isend/irecv, Triton kernels, no
CPU shim. A small GDN-H1-like model (G/S blocks, two per stage) trains 3 steps of 4 micro-batches;
the losses must equal the one-GPU run: float32 to 1e-5 relative, and bfloat16 autocast with the bf16
residual stream (model.residual_dtype=compute: the stages pass bf16 activations) to 1e-2 (the same
ops; only the clipping norm is summed in another order, which bf16 rounding may amplify a little).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]

MODEL = ["model.d_model=256", "model.layer_pattern=GSGS", "model.n_heads=4", "model.head_dim=64",
         "model.attn_heads=4", "model.attn_head_dim=64", "model.window=128", "data.seq_len=2048",
         "data.micro_batch_size=1", "model.document_end_id=null", "train.grad_accum=4", "train.steps=3",
         "train.warmup_steps=1", "train.log_every=1", "train.progress=false", "train.tensorboard=false",
         "train.device=cuda"]


def _train(tmp_path: Path, name: str, *overrides: str) -> list[float]:
    out = tmp_path / name
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "lctrain.cli", "train", *MODEL, *overrides, f"train.out_dir={out}",
           f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-2000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_pp2_on_two_gpus_equals_one_gpu(tmp_path, dtype, rel):
    extra = [f"train.dtype={dtype}", "model.residual_dtype=compute"]
    one = _train(tmp_path, "pp1", *extra)
    two = _train(tmp_path, "pp2", *extra, "parallel.pp=2")
    print(f"{dtype}: pp=1 {one}\n{dtype}: pp=2 {two}")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=rel)
