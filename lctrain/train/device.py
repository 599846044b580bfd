"""Where a rank computes: its device, its CPU thread count, its autocast dtype, its seeds."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import torch


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


def pick_device(train_cfg) -> torch.device:
    """auto: one CUDA device per local rank when CUDA is present, else CPU."""
    want = train_cfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); lower parallel.nproc_per_node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(cpu_threads())
    return torch.device("cpu")


def cpu_threads() -> int:
    """Intra-op threads on CPU: OMP_NUM_THREADS when set (torchrun sets 1 per worker), else the
    cores per local rank, but 1 when the machine is already busy (load average >= cores): the small
    ops of these models then lose far more to OpenMP barriers waiting on descheduled threads than
    they gain (measured on the 2-core CI box: 2 threads under load ran ~20x slower than 1)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = os.cpu_count() or 1
    per_rank = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:
        busy = False
    return 1 if busy else per_rank


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


class CpuThreadsGuard:
    """Drops to 1 intra-op thread when CPU steps suddenly run much slower than the best so far.

    When other processes compete for the cores, OpenMP barriers wait on descheduled threads and a
    multi-threaded step of these small ops can become 10-20x slower (measured on a 2-core box);
    one thread keeps most of the speed. Checked every step after a few warm-up steps; acts once."""

    def __init__(self, device: torch.device):
        self.active = device.type == "cpu" and torch.get_num_threads() > 1
        self.best = math.inf

    def observe(self, steps_done: int, step_time: float, reporter) -> None:
        if not self.active:
            return
        if steps_done >= 3:
            if step_time > 4 * self.best:
                torch.set_num_threads(1)
                self.active = False
                reporter.say(f"lctrain train: a step took {step_time:.2f}s against {self.best:.2f}s at best; the cores look busy, "
                             "continuing with 1 CPU thread (set OMP_NUM_THREADS to choose)")
                return
            self.best = min(self.best, step_time)
        elif steps_done >= 1:
            self.best = min(self.best, step_time)
