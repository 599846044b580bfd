"""The training job of one rank: `Trainer` and `train(cfg)`, the entry point of `lctrain train`.

`Trainer(cfg, device)` builds everything from the config on this process's mesh (a one-process
world when no mesh was initialised: every mesh query then answers for one rank): the model,
optimizer, LR schedule and (unless `data=False`) the train loader. Then:

- `compute_loss(batch)`: one micro-batch's loss, the one place the loss is computed;
- `step(batches)`: one optimizer step over this rank's micro-batches; returns `StepMetrics`;
- `save(step)` / `load(path)`: checkpoints (collective over all ranks);
- `run()`: the loop: resume, step to train.steps, report, checkpoint; returns a summary.

How the gradients of the ranks are combined (and why the loss is scaled as it is): grad_comm.py.
Under pipeline parallelism (parallel.pp > 1) this rank's model is one stage (a contiguous range of
blocks, lctrain.models.hybrid) and a step's train.grad_accum micro-batches are the pipeline's
micro-batches, run by megatron-core's 1F1B schedule (lctrain.parallel.pipeline); the loss exists on the
last stage and is broadcast to the others for the report.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from lctrain.parallel import mesh
from lctrain.train.bad_steps import BadStepGuard
from lctrain.train.cadence import CheckpointCadence
from lctrain.train.checkpoint import (
    ckpt_root,
    finished_steps,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from lctrain.train.device import TrainingError, device_text, pick_device, pick_dtype, seed_everything
from lctrain.train.grad_comm import broadcast_parameters, clip_grad_norm, mean_over_group, reduce_gradients
from lctrain.train.metrics import Reporter
from lctrain.train.metrics_file import restart_metrics
from lctrain.train.optim import build_optimizer, build_scheduler
from lctrain.train.preemption import StopSignals, requeue_or_exit_code
from lctrain.train.step import answer_weights, lm_loss

__all__ = ["StepMetrics", "Trainer", "TrainingError", "train"]


@dataclass
class StepMetrics:
    """What one optimizer step reports."""
    step: int  # optimizer steps done, this one included
    loss: float  # unweighted mean loss over the step's micro-batches and the dp x cp replicas
    grad_norm: float  # global L2 norm of the gradients before clipping
    lr: float  # the learning rate this step used
    skipped: bool = False  # loss or gradient norm not finite: the optimizer did not update (bad_steps.py)


def _millions(n: int) -> str:
    """1.42M; below a million three significant digits (0.0712M), so small models still compare."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e6:.3g}M"


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


class Trainer:
    """One rank's model, optimizer, schedule and data, and the step that trains them."""

    def __init__(self, cfg: DictConfig, device: torch.device, *, data: bool = True):
        from lctrain.data import build_train_loader
        from lctrain.models import build_model

        t = cfg.train
        self.cfg, self.device = cfg, device
        self.is_main = mesh.is_main()
        self.cp_group, self.cp_rank, self.cp_size = mesh.cp_group(), mesh.cp_rank(), mesh.cp_size()
        self.dp_rank, self.dp_size, self.grad_group = mesh.dp_rank(), mesh.dp_size(), mesh.dp_cp_group()
        self.tp_group, self.tp_rank = mesh.tp_group(), mesh.tp_rank()
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.dtype = pick_dtype(t, device)
        if device.type == "cpu" and self.dtype == torch.bfloat16 and cfg.model.kernel_backend == "triton":
            # bf16 autocast on CPU is real with the torch kernels; the Triton interpreter computes bf16 wrongly
            raise TrainingError("train.dtype=bfloat16 on CPU with model.kernel_backend=triton runs the Triton "
                                "interpreter, "
                                "whose bfloat16 results are wrong; use model.kernel_backend=auto (torch on CPU) or "
                                "train.dtype=float32")
        self._refuse_gpu_kernel_shapes(cfg, device)
        if self.cp_size != cfg.parallel.cp or (cfg.parallel.cp > 1 and self.cp_group is None):
            # context_parallel(op, None) falls back to the plain op: a missing group would train on wrong math.
            raise TrainingError(f"parallel.cp={cfg.parallel.cp} but the mesh has a CP group of size {self.cp_size}")
        if mesh.tp_size() != cfg.parallel.tp:
            raise TrainingError(f"parallel.tp={cfg.parallel.tp} but the mesh has a TP group of size {mesh.tp_size()}")
        self.pp_group, self.pp_rank, self.pp_size = mesh.pp_group(), mesh.pp_rank(), mesh.pp_size()
        if self.pp_size != cfg.parallel.pp:
            raise TrainingError(f"parallel.pp={cfg.parallel.pp} but the mesh has {self.pp_size} pipeline stages")
        if self.pp_size > 1 and self.dp_size > 1:  # (config.validate refuses it for nproc_per_node)
            raise TrainingError(f"parallel.pp={self.pp_size} with {self.dp_size} data-parallel replicas (world "
                                f"{self.world}) is not supported yet; launch tp*cp*pp processes")

        seed_everything(t.seed)
        self.model = build_model(cfg.model, cp_group=self.cp_group, tp_group=self.tp_group,
                                 max_position=cfg.data.seq_len, pp_stage=(self.pp_rank, self.pp_size),
                                 sequence_parallel=bool(cfg.parallel.sequence_parallel)).to(device)
        broadcast_parameters(self.model, self.grad_group)
        self.pipeline = None
        if self.pp_size > 1:
            from lctrain.parallel.pipeline import PipelineSchedule

            self.pipeline = PipelineSchedule(self.model, pp_group=self.pp_group, cp_size=self.cp_size,
                                             n_layers=len(self.model.pattern), hidden_size=cfg.model.d_model,
                                             device=device)
            self.embedding_group = mesh.embedding_group() if cfg.model.tie_embeddings else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, t, self.grad_group if t.get("shard_optimizer") else None)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.loader = None
        if data:
            self.loader = build_train_loader(
                cfg.data, dp_rank=self.dp_rank, dp_size=self.dp_size, cp_rank=self.cp_rank, cp_size=self.cp_size,
                tp_size=cfg.parallel.tp, global_rank=dist.get_rank() if dist.is_initialized() else 0,
                world_size=self.world,
                document_end_id=cfg.model.document_end_id,
            )
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.step_count = 0  # optimizer steps done (restored by load)
        self.bad_steps = BadStepGuard(t.max_bad_steps)

    def _refuse_gpu_kernel_shapes(self, cfg, device) -> None:
        """The head dims / dtypes the Triton mixer kernels refuse on a GPU (ops.gpu_refusal), refused here before
        the model, the data and the optimizer are built rather than at the first forward."""
        from lctrain.config import LINEAR_LAYERS
        if device.type != "cuda" or cfg.model.kernel_backend not in ("auto", "triton"):
            return
        if not any(c in LINEAR_LAYERS for c in str(cfg.model.layer_pattern)):
            return
        from lctrain.kernels.triton.ops import gpu_refusal
        why = gpu_refusal(int(cfg.model.head_dim), int(cfg.model.head_dim), self.dtype)
        if why is not None:
            raise TrainingError(f"model.head_dim={cfg.model.head_dim} with train.dtype={cfg.train.dtype}: {why}")

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()

    def compute_loss(self, batch: dict, stage_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss, mean_loss) of one micro-batch (`input_ids`, `labels`, optional `answer_mask` and
        `doc_bounds`, the packed documents' boundaries the loader found):
        this rank's differentiable share (answer tokens weighted) and the detached unweighted mean
        of the whole sequence (see step.lm_loss). On the last pipeline stage `stage_input` is the
        previous stage's output."""
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        weights = answer_weights(batch, self.cfg.train.answer_loss_weight, self.device)
        with self._autocast():
            return lm_loss(self.model, input_ids, labels, cp_group=self.cp_group,
                           position_offset=self.cp_rank * input_ids.shape[1],
                           token_weights=weights, doc_bounds=batch.get("doc_bounds"),
                           loss_chunk_tokens=self.cfg.train.loss_chunk_tokens, stage_input=stage_input)

    def residual_dtype(self) -> torch.dtype:
        """The dtype of the residual stream between blocks (what pipeline stages pass on): the autocast
        dtype with model.residual_dtype=compute under autocast, else the parameters'."""
        if self.cfg.model.residual_dtype == "compute" and self.dtype != torch.float32:
            return self.dtype
        return self.params[0].dtype

    def stage_output(self, batch: dict, stage_input: torch.Tensor | None) -> torch.Tensor:
        """A pipeline stage before the last: its blocks' output for one micro-batch, in the residual
        dtype (what the next stage receives)."""
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        with self._autocast():
            hidden = self.model.hidden_states(input_ids, position_offset=self.cp_rank * input_ids.shape[1],
                                              doc_bounds=batch.get("doc_bounds"), stage_input=stage_input)
        return hidden.to(self.residual_dtype())

    def _pipeline_forward_backward(self, batches: Sequence[dict]) -> torch.Tensor:
        """`forward_backward` through the pipeline's 1F1B schedule (lctrain.parallel.pipeline)."""
        def forward(batch, stage_input):
            if self.model.has_head:
                loss, mean_loss = self.compute_loss(batch, stage_input)
                return loss, mean_loss.detach()
            return self.stage_output(batch, stage_input)

        ids = batches[0]["input_ids"]
        seq = ids.shape[1] // (self.cfg.parallel.tp if self.cfg.parallel.sequence_parallel else 1)
        shape = (ids.shape[0], seq, self.cfg.model.d_model)  # sequence parallelism passes the TP rank's slice
        reports = self.pipeline.forward_backward(forward, batches, shape, self.residual_dtype())
        loss = torch.stack(reports).sum() / len(batches) if reports else torch.zeros((), device=self.device)
        return self.pipeline.from_last_stage(mean_over_group(loss.float(), self.grad_group))

    def forward_backward(self, batches: Sequence[dict]) -> torch.Tensor:
        """Accumulate the gradients of the micro-batches (each loss / len(batches)); returns the step's
        mean loss, averaged over the dp x cp replicas (every CP rank holds the same mean)."""
        if self.pipeline is not None:
            return self._pipeline_forward_backward(batches)
        loss_sum = torch.zeros((), device=self.device)
        for batch in batches:
            loss, mean_loss = self.compute_loss(batch)
            loss = loss / len(batches)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += mean_loss.detach()
        return mean_over_group(loss_sum / len(batches), self.grad_group)

    def finish_gradients(self) -> torch.Tensor:
        """Reduce the gradients over the replicas, unscale them (float16), clip them; returns the norm before
        clipping."""
        reduce_gradients(self.params, self.grad_group, self.dp_size, self.tp_group)
        if self.pipeline is not None:
            from lctrain.parallel.pipeline import sum_tied_embedding_grads

            sum_tied_embedding_grads(self.model.embed.weight if self.model.embed is not None else None,
                                     self.embedding_group)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return clip_grad_norm(self.params, self.cfg.train.grad_clip, self.tp_group, self.pp_group)

    def optimizer_step(self, apply: bool = True) -> None:
        """Apply the finished gradients (unless `apply` is False: a skipped step leaves parameters and
        optimizer state untouched), advance the LR schedule, drop the gradients."""
        if apply:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, batches: Sequence[dict]) -> StepMetrics:
        """One optimizer step over this rank's micro-batches (`run` passes train.grad_accum of them).

        The loss and the gradient norm (the same on every rank) are known before `optimizer_step`
        acts: a step where either is not finite is skipped (bad_steps.py); train.max_bad_steps of
        them in a row end the run with a message naming the step. float16's GradScaler skips
        overflowing gradients itself (and lowers its scale), so there only the loss is judged."""
        loss = float(self.forward_backward(batches))
        grad_norm = float(self.finish_gradients())
        lr = self.optimizer.param_groups[0]["lr"]
        self.step_count += 1
        good = self.bad_steps.is_good(self.step_count, loss, grad_norm if self.scaler is None else 0.0)
        self.optimizer_step(apply=good)
        return StepMetrics(step=self.step_count, loss=loss, grad_norm=grad_norm, lr=lr, skipped=not good)

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int | None = None) -> Path:
        """Collective: write checkpoint `step_<step>` (default: the steps done) under train.out_dir."""
        return save_checkpoint(self.cfg.train.out_dir, self.step_count if step is None else step, model=self.model,
                               optimizer=self.optimizer, scheduler=self.scheduler, loader=self.loader, cfg=self.cfg,
                               tp_group=self.tp_group, dp_rank=self.dp_rank, dp_size=self.dp_size)

    def load(self, path, verified: bool = False) -> int:
        """Collective: restore model, optimizer, schedule, loader position and RNGs (saved with any
        parallel layout); returns the step. `verified`: `path` has just passed its manifest check
        (latest_checkpoint), skip hashing it again."""
        self.step_count = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                          loader=self.loader, cfg=self.cfg, tp_group=self.tp_group,
                                          dp_rank=self.dp_rank, dp_size=self.dp_size, verified=verified)
        return self.step_count

    def peak_memory_mib(self) -> float | None:
        """The largest peak of allocated GPU memory over all ranks so far (collective); None off CUDA."""
        return self._max_over_ranks_mib(torch.cuda.max_memory_allocated) if self.device.type == "cuda" else None

    def held_memory_mib(self) -> float | None:
        """GPU memory still allocated between steps, the largest over ranks (collective); None off CUDA.
        After `optimizer_step` that is what the run holds for good: weights, optimizer state and the
        gradient buffers a DDP wrapper keeps, i.e. what tensor parallelism and a sharded optimizer divide."""
        return self._max_over_ranks_mib(torch.cuda.memory_allocated) if self.device.type == "cuda" else None

    def _max_over_ranks_mib(self, measure) -> float:
        value = torch.tensor(float(measure(self.device)) / 2**20, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value)

    def parameter_counts(self) -> tuple[int, int, int]:
        """(parameters of the whole model, fewest and most parameters a rank holds); collective under
        pp > 1. A tied head counts once (also when the last pipeline stage holds a copy of the table)."""
        from lctrain.parallel.pipeline import is_pipeline_copy
        from lctrain.parallel.tensor_parallel import TP_SPLIT_DIM

        seen, local, split, copies = set(), 0, 0, 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                local += p.numel()
                split += p.numel() if hasattr(p, TP_SPLIT_DIM) else 0
                copies += p.numel() * self.cfg.parallel.tp if is_pipeline_copy(p) else 0
        whole = local + split * (self.cfg.parallel.tp - 1) - copies  # this stage's share of the whole model
        if self.pp_size == 1:
            return whole, local, local
        counts = torch.tensor([whole, local, -local], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts[:1], group=self.pp_group)
        dist.all_reduce(counts[1:], op=dist.ReduceOp.MAX)
        return int(counts[0]), -int(counts[2]), int(counts[1])

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Resume (train.resume) from the newest checkpoint that verifies, train to train.steps, checkpoint
        every train.ckpt_every steps / train.ckpt_minutes minutes, on SIGUSR1/SIGTERM/SIGINT
        (then stop: preemption.py) and at the end. Returns a summary; its exit_code is the command's."""
        cfg, t = self.cfg, self.cfg.train
        if self.loader is None:
            raise TrainingError("Trainer.run needs the train loader; build the Trainer with data=True")
        resume_from = latest_checkpoint(t.out_dir, quarantine=True) if t.resume else None
        if resume_from is not None:
            self.load(resume_from, verified=True)
        elif not t.resume and finished_steps(ckpt_root(t.out_dir)):
            newest = finished_steps(ckpt_root(t.out_dir))[0]
            raise TrainingError(f"train.resume=false but {newest} exists: starting over in this out_dir would mix two "
                                "runs' checkpoints; use a new train.out_dir (or delete its ckpt/ folder)")
        init_from = None
        if resume_from is None and t.get("init_from"):
            init_from = load_model_weights(t.init_from, self.model, self.tp_group)
        start_step = self.step_count

        tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len * t.grad_accum * self.dp_size
        out = Path(t.out_dir)
        if self.is_main:
            restart_metrics(out / "metrics.jsonl", start_step, str(resume_from) if resume_from else None)
        reporter = Reporter(cfg, self.is_main, start_step)
        n_params, fewest, most = self.parameter_counts()
        per_rank = _millions(most) if fewest == most else f"{_millions(fewest)} to {_millions(most)}"
        reporter.say(
            f"lctrain train: {_millions(n_params)} parameters ({per_rank} per rank), layers "
            f"{cfg.model.layer_pattern}, seq_len {cfg.data.seq_len}, "
            f"world {self.world} (dp {self.dp_size} x cp {self.cp_size} x tp {cfg.parallel.tp}"
            f"{' sequence-parallel' if cfg.parallel.sequence_parallel else ''} x pp {self.pp_size}), "
            f"{device_text(self.device)} {str(self.dtype).replace('torch.', '')}, "
            f"steps {start_step}->{t.steps}" + (f", resumed from {resume_from}" if resume_from else "")
            + (f", weights from {init_from}" if init_from else "")
        )
        reporter.say(f"lctrain train: out_dir {out}: checkpoints {out / 'ckpt'}, metrics {out / 'metrics.jsonl'}"
                     + (f", tensorboard {out / 'tb'}" if t.tensorboard else ""))
        if start_step >= t.steps:
            reporter.say(f"lctrain train: {resume_from} is already at step {start_step} of train.steps={t.steps}; "
                         "nothing to do "
                         "(raise train.steps to continue, or use a new train.out_dir / train.resume=false to start "
                         "over)")
        batches = _Infinite(self.loader)
        self.model.train()
        first_loss = last_loss = None
        ckpt, last_saved, stopped_by = resume_from, start_step if resume_from is not None else -1, 0
        cadence = CheckpointCadence(t.ckpt_every, t.ckpt_minutes, t.steps)
        stop = StopSignals().install()
        run_start = time.perf_counter()
        try:
            for _ in range(start_step, t.steps):
                step_start = time.perf_counter()
                metrics = self.step([next(batches) for _ in range(t.grad_accum)])
                if metrics.skipped:
                    reporter.say(f"lctrain train: step {metrics.step}: loss {metrics.loss}, grad_norm "
                                 f"{metrics.grad_norm}: not finite, update skipped ({self.bad_steps.in_row} in a row, "
                                 f"{self.bad_steps.total} in all)")
                first_loss = metrics.loss if first_loss is None else first_loss
                last_loss = metrics.loss
                reporter.step(metrics.step, metrics.loss, metrics.lr, tokens_per_step, time.perf_counter() - step_start,
                              metrics.grad_norm, self.bad_steps.total,
                              self.peak_memory_mib(), self.held_memory_mib())
                signum, save_due = stop.poll(cadence.by_time(metrics.step) if self.is_main else False, self.device)
                if metrics.step < t.steps and (signum or save_due or cadence.by_steps(metrics.step)):
                    ckpt, last_saved = self.save(), metrics.step
                    cadence.saved()
                    if signum:  # on the last step the run simply finishes
                        stopped_by = signum
                        break
            # nothing trained: write nothing (above all no older step); train.save_final=false: no save at the end
            if start_step < t.steps and not stopped_by and t.save_final:
                ckpt = self.save(t.steps) if last_saved != t.steps else ckpt
        finally:
            stop.restore()
            reporter.close()
        wall = time.perf_counter() - run_start
        summary = {"steps": t.steps, "start_step": start_step, "first_loss": first_loss, "last_loss": last_loss,
                   "wall_s": wall,
                   "checkpoint": str(ckpt), "bad_steps": self.bad_steps.total, "exit_code": 0}
        if stopped_by:
            summary["exit_code"] = requeue_or_exit_code(stopped_by, ckpt, reporter.say)
        elif self.is_main:
            losses = f"loss {first_loss:.4f} -> {last_loss:.4f}, " if first_loss is not None else ""
            saved = (f"checkpoint {ckpt}" if t.save_final else
                     f"no final checkpoint (train.save_final=false; last saved: {ckpt})")
            print(f"lctrain train: done, {losses}{wall:.1f}s, {saved}", flush=True)
        return summary


def train(cfg: DictConfig) -> dict:
    """Run the whole job in this process (the mesh must not be initialised yet). Returns a summary."""
    device = pick_device(cfg.train)
    mesh.init_mesh(cfg.parallel, device)
    try:
        return Trainer(cfg, device).run()
    finally:
        mesh.destroy_mesh()
