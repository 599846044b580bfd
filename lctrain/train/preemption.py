"""Stopping a run on a signal without losing work: SIGUSR1 (what Slurm sends before preemption or
the time limit, with `#SBATCH --signal=B:USR1@<grace>`), SIGTERM and SIGINT (Ctrl-C).

The handler only records the signal. At the end of every step the ranks agree (`StopSignals.poll`:
one small all-reduce MAX over the world, which also carries the time-based "save now" flag of
rank 0), so every rank finishes the same step, the checkpoint is written collectively and
atomically, and then the job requeues itself under Slurm (`scontrol requeue $SLURM_JOB_ID`) or
exits with one line and the code 128 + signal outside Slurm. A second signal while stopping only
prints that the save is under way: it cannot interrupt (and so corrupt) the save.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Records SIGUSR1 / SIGTERM / SIGINT while installed (main thread only); see the module doc."""

    def __init__(self, prog: str = "lctrain train"):
        self.prog = prog
        self.signum = 0
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back, unless a stop is under way: then further signals keep being
        only noted until the process has exited (a late one must not kill the clean exit)."""
        if self.signum:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # os.write, not print: a handler may run while the main thread is inside print
        if self.signum:
            os.write(2, f"{self.prog}: got {signal_name(signum)} again; the checkpoint is being written, "
                        "please wait (kill -9 loses only the work since the last checkpoint)\n".encode())
            return
        self.signum = signum
        os.write(2, f"{self.prog}: got {signal_name(signum)}; finishing this step and saving a checkpoint\n".encode())

    def poll(self, save_due: bool, device: torch.device) -> tuple[int, bool]:
        """Collective: -> (the signal any rank got, 0 if none; whether any rank wants a save now)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum, save_due
        flags = torch.tensor([self.signum, int(save_due)], dtype=torch.int64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, due = int(flags[0]), bool(flags[1])
        if signum and not self.signum:
            self.signum = signum  # another rank got it: stop with it (a later local signal is "again")
        return signum, due


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_or_exit_code(signum: int, checkpoint, say) -> int:
    """After the stop checkpoint: requeue the Slurm job (-> 0), or say how to resume (-> 128 + signum).
    `say` prints on the main rank only; call it on every rank (only rank 0 requeues)."""
    name = signal_name(signum)
    job = slurm_job_id()
    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if job is not None:
        if is_main:
            scontrol = shutil.which("scontrol")
            proc = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True) if scontrol else None
            if proc is not None and proc.returncode == 0:
                say(f"lctrain train: stopped on {name}; checkpoint {checkpoint} written; Slurm job {job} requeued, it "
                    "resumes from there")
                return 0
            why = "scontrol not found" if proc is None else (proc.stderr.strip() or f"exit {proc.returncode}")
            say(f"lctrain train: stopped on {name}; checkpoint {checkpoint} written; requeueing Slurm job {job} failed "
                f"({why}): resubmit the job to resume")
            return 128 + signum
        return 0
    say(f"lctrain train: stopped on {name}; checkpoint {checkpoint} written; run the same command again to resume")
    return 128 + signum
