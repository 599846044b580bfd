"""Sequence parallelism on 2 GPUs with NCCL (`python -m pytest -m gpu tests/test_sequence_parallel_gpu.py`).

The CPU tests (tests/test_sequence_parallel.py) check the math on gloo against one process; here
`lctrain train parallel.tp=2 parallel.sequence_parallel=true` runs with NCCL, Triton kernels and bf16
autocast on a small model with every layer kind (G, S, D, M, L, K, F, A), checkpointed blocks and the
chunked loss. Its losses must equal those of the same run without sequence parallelism to bf16
tolerance (the same ops; only the norm weights' gradients are summed over the two sequence halves).
"""
from __future__ import annotations

import json

import pytest
import torch
from test_pp_gpu import _train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]

SP_MODEL = ["model.layer_pattern=GSDMLKFA", "model.loglinear_levels=12", "model.activation_checkpointing=full",
            "train.loss_chunk_tokens=1024", "train.dtype=bfloat16", "parallel.tp=2"]


def test_tp2_sequence_parallel_on_two_gpus_equals_tp2(tmp_path):
    plain = _train(tmp_path, "tp2", *SP_MODEL)
    sp = _train(tmp_path, "tp2sp", *SP_MODEL, "parallel.sequence_parallel=true")
    peaks = {name: max(r.get("peak_mib", 0) for r in map(json.loads, (tmp_path / name / "metrics.jsonl").open()))
             for name in ("tp2", "tp2sp")}
    print(f"tp=2 {plain}\ntp=2 + sequence parallelism {sp}\npeak MiB per GPU (for reading, not asserted: this "
          f"model is too small for activations to dominate) {peaks}")
    assert len(plain) == len(sp) == 3
    assert sp == pytest.approx(plain, rel=1e-2)
