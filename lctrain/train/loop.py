"""The training loop of one process (one rank of the job).

Gradient reduction (chosen over DDP, and documented here because the loss scaling depends on it):
each rank's loss is its share of its sequence's mean (see step.lm_loss), divided by grad_accum.
After the micro-batches of a step, every gradient is all-reduced with SUM over `dp_cp_group()`
(data x context parallel) and divided by dp_size: the CP sum turns the shares into the gradient
of each sequence's mean, the division averages over the data-parallel replicas. Every rank of the
group then holds the same gradient and takes the same optimizer step, so replicas stay identical
without broadcasting parameters after initialisation.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from lctrain.errors import UserError

from lctrain.train.bad_steps import BadStepGuard
from lctrain.train.cadence import CheckpointCadence
from lctrain.train.checkpoint import check_not_back_in_time, latest_checkpoint, load_checkpoint, save_checkpoint
from lctrain.train.metrics_file import restart_metrics
from lctrain.train.preemption import StopSignals, requeue_or_exit_code
from lctrain.train.optim import build_optimizer, build_scheduler
from lctrain.train.step import lm_loss

_BUCKET_NUMEL = 32 * 1024 * 1024  # gradients are all-reduced in flat fp32 buckets of this size


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


class _CpuThreadsGuard:
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


def _device_text(device: torch.device) -> str:
    return f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def broadcast_parameters(model: torch.nn.Module, group) -> None:
    """Make every replica in `group` start from its first rank's parameters (belt and braces: all
    ranks seed identically, but an init that draws different random numbers per rank would drift)."""
    if _group_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src=src, group=group)


def reduce_gradients(params: list[torch.nn.Parameter], group, dp_size: int) -> None:
    """SUM over the dp x cp group, then / dp_size (see the module docstring)."""
    if _group_size(group) == 1 and dp_size == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    start = 0
    while start < len(grads):
        bucket, numel = [], 0
        while start < len(grads) and (not bucket or numel + grads[start].numel() <= _BUCKET_NUMEL):
            bucket.append(grads[start])
            numel += grads[start].numel()
            start += 1
        flat = torch.cat([g.reshape(-1).float() for g in bucket])
        if _group_size(group) > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(dp_size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def answer_weights(batch: dict, answer_loss_weight: float, device) -> torch.Tensor | None:
    """Per-token loss weights: train.answer_loss_weight on the tokens the dataset marks as answers
    (its `answer_mask` column: the synthetic needle samples' answer digits), 1 elsewhere. None when
    the data has no such column or the weight is 1."""
    mask = batch.get("answer_mask")
    if mask is None or answer_loss_weight == 1.0:
        return None
    return 1.0 + (float(answer_loss_weight) - 1.0) * mask.to(device, non_blocking=True).float()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, tp_group=None) -> torch.Tensor:
    """Global L2 norm of the gradients, clipped to max_norm (<= 0: only measured).

    Parameters sharded by tensor parallelism (megatron marks them `tensor_model_parallel`) add their
    squares over the TP group; replicated ones count once."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    sharded = torch.zeros((), device=device, dtype=torch.float32)
    replicated = torch.zeros((), device=device, dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if _group_size(tp_group) > 1:
        dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=tp_group)
    norm = (sharded + replicated).sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm


class _Infinite:
    """Iterates the loader for ever (a finite loader starts its next epoch)."""

    def __init__(self, loader):
        self.loader, self.it = loader, None

    def __next__(self):
        if self.it is None:
            self.it = iter(self.loader)
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


class _Reporter:
    """Progress bar (rich, on a TTY), log lines, metrics.jsonl and tensorboard; main rank only."""

    def __init__(self, cfg: DictConfig, main: bool, start_step: int):
        self.main, self.cfg = main, cfg
        self.out_dir = Path(cfg.train.out_dir)
        self.progress = self.task = self.tb = None
        self.tps_ema = None
        self.window_tokens, self.window_time = 0.0, 0.0
        if not main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.out_dir / "metrics.jsonl", "a")
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError as err:  # tensorboard is a dependency, but do not die for a log
                print(f"lctrain train: tensorboard unavailable ({err}); continuing without it", file=sys.stderr)
        if cfg.train.progress and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("train", total=cfg.train.steps, completed=start_step, loss="-", lr="-", tps="-")
            self.progress.start()

    def say(self, text: str) -> None:
        if not self.main:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def step(self, step: int, loss: float, lr: float, tokens: float, seconds: float, grad_norm: float, bad_steps: int = 0) -> None:
        if not self.main:
            return
        tps = tokens / max(seconds, 1e-9)
        self.tps_ema = tps if self.tps_ema is None else 0.9 * self.tps_ema + 0.1 * tps
        self.window_tokens += tokens
        self.window_time += seconds
        record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tps, "grad_norm": grad_norm, "bad_steps": bad_steps}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/tokens_per_s", tps, step)
            self.tb.add_scalar("train/grad_norm", grad_norm, step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{self.tps_ema:,.0f}")
        every = self.cfg.train.log_every
        if every > 0 and (step % every == 0 or step == self.cfg.train.steps):
            window_tps = self.window_tokens / max(self.window_time, 1e-9)  # mean since the last log line
            self.window_tokens, self.window_time = 0.0, 0.0
            self.say(f"step {step}/{self.cfg.train.steps}  loss {loss:.4f}  lr {lr:.3e}  grad_norm {grad_norm:.3f}  {window_tps:,.0f} tok/s")

    def close(self) -> None:
        if not self.main:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        self.metrics.close()


def train(cfg: DictConfig) -> dict:
    """Run the whole job in this process (the mesh must not be initialised yet). Returns a summary."""
    from lctrain.parallel import mesh

    device = pick_device(cfg.train)
    mesh.init_mesh(cfg.parallel, device)
    try:
        return _train(cfg, device, mesh)
    finally:
        mesh.destroy_mesh()


def _train(cfg: DictConfig, device: torch.device, mesh) -> dict:
    from lctrain.data import build_train_loader
    from lctrain.models import build_model

    t = cfg.train
    if cfg.parallel.pp > 1:
        raise TrainingError("parallel.pp > 1 is not supported by the training loop yet; use parallel.pp=1")
    main = mesh.is_main()
    cp_group, cp_rank, cp_size = mesh.cp_group(), mesh.cp_rank(), mesh.cp_size()
    dp_rank, dp_size, grad_group = mesh.dp_rank(), mesh.dp_size(), mesh.dp_cp_group()
    tp_group, tp_rank = _tp_group_and_rank(cfg, mesh)
    dtype = pick_dtype(t, device)

    if cp_size != cfg.parallel.cp or (cfg.parallel.cp > 1 and cp_group is None):
        # context_parallel(op, None) falls back to the plain op: a missing group would train on wrong math.
        raise TrainingError(f"parallel.cp={cfg.parallel.cp} but the mesh has a CP group of size {cp_size}")
    seed_everything(t.seed)
    model = build_model(cfg.model, cp_group=cp_group, max_position=cfg.data.seq_len).to(device)
    broadcast_parameters(model, grad_group)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    world = dist.get_world_size() if dist.is_initialized() else 1
    loader = build_train_loader(
        cfg.data, dp_rank=dp_rank, dp_size=dp_size, cp_rank=cp_rank, cp_size=cp_size,
        tp_size=cfg.parallel.tp, global_rank=dist.get_rank() if dist.is_initialized() else 0, world_size=world,
    )

    start_step = 0
    resume_from = latest_checkpoint(t.out_dir, quarantine=True) if t.resume else None
    if resume_from is not None:
        start_step = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, cfg=cfg,
                                     tp_rank=tp_rank, verified=True)
    elif not t.resume:
        check_not_back_in_time(t.out_dir, 0)

    tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len * t.grad_accum * dp_size
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if main:
        restart_metrics(Path(t.out_dir) / "metrics.jsonl", start_step, str(resume_from) if resume_from else None)
    reporter = _Reporter(cfg, main, start_step)
    n_params = sum(p.numel() for p in params)
    reporter.say(
        f"lctrain train: {n_params / 1e6:.2f}M parameters, layers {cfg.model.layer_pattern}, seq_len {cfg.data.seq_len}, "
        f"world {world} (dp {dp_size} x cp {cp_size} x tp {cfg.parallel.tp}), {_device_text(device)} {str(dtype).replace('torch.', '')}, "
        f"steps {start_step}->{t.steps}" + (f", resumed from {resume_from}" if resume_from else "")
    )
    out = Path(t.out_dir)
    reporter.say(f"lctrain train: out_dir {out}: checkpoints {out / 'ckpt'}, metrics {out / 'metrics.jsonl'}"
                 + (f", tensorboard {out / 'tb'}" if t.tensorboard else ""))

    if start_step >= t.steps:
        reporter.say(f"lctrain train: {resume_from} is already at step {start_step} of train.steps={t.steps}; nothing to do "
                     "(raise train.steps to continue, or use a new train.out_dir / train.resume=false to start over)")
    threads_guard = _CpuThreadsGuard(device)
    batches = _Infinite(loader)
    model.train()
    first_loss = last_loss = None
    last_saved = start_step if resume_from is not None else -1
    run_start = time.perf_counter()
    bad_steps = BadStepGuard(t.max_bad_steps)
    cadence = CheckpointCadence(t.ckpt_every, t.ckpt_minutes, t.steps)
    stop = StopSignals().install()
    stopped_by = 0

    def save(step_done: int):
        path = save_checkpoint(t.out_dir, step_done, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, cfg=cfg, tp_rank=tp_rank)
        cadence.saved()
        return path

    try:
        for step in range(start_step, t.steps):
            step_start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for _ in range(t.grad_accum):
                batch = next(batches)
                input_ids = batch["input_ids"].to(device, non_blocking=True)
                labels = batch["labels"].to(device, non_blocking=True)
                weights = answer_weights(batch, t.answer_loss_weight, device)
                with autocast:
                    loss, mean_loss = lm_loss(model, input_ids, labels, cp_group=cp_group, position_offset=cp_rank * input_ids.shape[1],
                                              token_weights=weights)
                loss = loss / t.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += mean_loss.detach()
            reduce_gradients(params, grad_group, dp_size)
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = clip_grad_norm(params, t.grad_clip, tp_group)
            lr = optimizer.param_groups[0]["lr"]
            # every cp rank holds the same mean; average over the data-parallel replicas
            stat = loss_sum / t.grad_accum
            if _group_size(grad_group) > 1:
                dist.all_reduce(stat, op=dist.ReduceOp.SUM, group=grad_group)
                stat = stat / (dp_size * cp_size)
            step_loss = float(stat)
            # fp16's GradScaler skips overflowing steps itself (and lowers its scale): only the loss counts then
            if bad_steps.is_good(step + 1, step_loss, float(grad_norm) if scaler is None else 0.0):
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
            else:
                reporter.say(f"lctrain train: step {step + 1}: loss {step_loss}, grad_norm {float(grad_norm)}: not finite, "
                             f"update skipped ({bad_steps.in_row} in a row, {bad_steps.total} in all)")
            if scaler is not None:
                scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            first_loss = step_loss if first_loss is None else first_loss
            last_loss = step_loss
            step_time = time.perf_counter() - step_start
            reporter.step(step + 1, step_loss, lr, tokens_per_step, step_time, float(grad_norm), bad_steps.total)
            threads_guard.observe(step - start_step, step_time, reporter)

            done = step + 1
            signum, save_due = stop.poll(cadence.by_time(done) if main else False, device)
            if done < t.steps and (signum or save_due or cadence.by_steps(done)):
                ckpt = save(done)
                last_saved = done
                if signum:  # stop here; on the last step the run simply finishes
                    stopped_by = signum
                    break
        if start_step >= t.steps:
            ckpt = resume_from  # nothing was trained: write nothing (above all not an older step)
        elif not stopped_by:
            ckpt = save(t.steps) if last_saved != t.steps else latest_checkpoint(t.out_dir)
    finally:
        stop.restore()
        reporter.close()
    wall = time.perf_counter() - run_start
    summary = {"steps": t.steps, "start_step": start_step, "first_loss": first_loss, "last_loss": last_loss, "wall_s": wall,
               "checkpoint": str(ckpt), "bad_steps": bad_steps.total, "exit_code": 0}
    if stopped_by:
        summary["exit_code"] = requeue_or_exit_code(stopped_by, ckpt, reporter.say)
        return summary
    if main:
        losses = f"loss {first_loss:.4f} -> {last_loss:.4f}, " if first_loss is not None else ""
        print(f"lctrain train: done, {losses}{wall:.1f}s, checkpoint {ckpt}", flush=True)
    return summary


def _tp_group_and_rank(cfg: DictConfig, mesh):
    """The tensor-parallel group and rank (None, 0 without TP)."""
    if cfg.parallel.tp == 1:
        return None, 0
    if hasattr(mesh, "tp_group"):
        return mesh.tp_group(), mesh.tp_rank()
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank()
