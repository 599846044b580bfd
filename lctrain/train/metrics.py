"""What a training run reports, on the main rank only: a rich progress bar (on a TTY) or log lines,
`out_dir/metrics.jsonl` (one JSON record per step; restarts marked, see metrics_file.py) and
tensorboard scalars (`out_dir/tb`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig


class Reporter:
    """Progress bar (rich, on a TTY), log lines, metrics.jsonl and tensorboard; a no-op off the main rank."""

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
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("train", total=cfg.train.steps, completed=start_step, loss="-", lr="-",
                                               tps="-")
            self.progress.start()

    def say(self, text: str) -> None:
        if not self.main:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def step(self, step: int, loss: float, lr: float, tokens: float, seconds: float, grad_norm: float,
             bad_steps: int = 0,
             peak_mib: float | None = None, held_mib: float | None = None) -> None:
        """`peak_mib`: the largest peak GPU memory of any rank so far; `held_mib`: the most any rank
        still holds after the step (weights, optimizer state, gradient buffers); both None on CPU."""
        if not self.main:
            return
        tps = tokens / max(seconds, 1e-9)
        self.tps_ema = tps if self.tps_ema is None else 0.9 * self.tps_ema + 0.1 * tps
        self.window_tokens += tokens
        self.window_time += seconds
        record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tps, "grad_norm": grad_norm,
                  "bad_steps": bad_steps}
        if peak_mib is not None:
            record["peak_mib"] = peak_mib
        if held_mib is not None:
            record["held_mib"] = held_mib
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/tokens_per_s", tps, step)
            self.tb.add_scalar("train/grad_norm", grad_norm, step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                 tps=f"{self.tps_ema:,.0f}")
        every = self.cfg.train.log_every
        if every > 0 and (step % every == 0 or step == self.cfg.train.steps):
            window_tps = self.window_tokens / max(self.window_time, 1e-9)  # mean since the last log line
            self.window_tokens, self.window_time = 0.0, 0.0
            self.say(f"step {step}/{self.cfg.train.steps}  loss {loss:.4f}  lr {lr:.3e}  grad_norm {grad_norm:.3f}  "
                     f"{window_tps:,.0f} tok/s")

    def close(self) -> None:
        if not self.main:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        self.metrics.close()
