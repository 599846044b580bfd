"""Where a rank computes: its device, its CPU thread count, its autocast dtype, its seeds."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from lctrain.errors import UserError


class TrainingError(UserError, RuntimeError):
    """The run cannot go on; the message says why and what to change."""


def pick_device(train_cfg) -> torch.device:
    """auto: one CUDA device per local rank when CUDA is present, else CPU."""
    want = train_cfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); lower "
                                "parallel.nproc_per_node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(cpu_threads())
    return torch.device("cpu")


def cpu_threads() -> int:
    """Intra-op threads on CPU, fixed for the whole run: OMP_NUM_THREADS when set (torchrun sets 1
    per worker), else the cores per local rank. Never the machine's load: the thread count changes
    the order of floating-point sums, so a count that followed the load made the same seed give
    different losses (up to 3.6e-4 within 100 steps). On a busy machine set OMP_NUM_THREADS=1: the
    small ops of these models lose more to OpenMP barriers waiting on descheduled threads than they
    gain (measured on the 2-core CI box: 2 threads under load ran ~20x slower than 1)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def pick_dtype(train_cfg, device: torch.device) -> torch.dtype:
    """The autocast dtype: auto = bf16 on CUDA, fp32 on CPU."""
    if train_cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, train_cfg.dtype)
    if dtype == torch.float16 and device.type != "cuda":
        raise TrainingError("train.dtype=float16 needs a CUDA device; use float32 or bfloat16 on CPU")
    return dtype


def device_text(device: torch.device) -> str:
    """How the start-up line names the device: `cpu (N threads)` or `cuda:i`."""
    return f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
