"""When to save: every `train.ckpt_every` steps and/or every `train.ckpt_minutes` minutes.

Time differs between ranks, so the time rule is only a proposal of rank 0; the ranks agree on it
in the same per-step all-reduce that carries stop signals (lctrain.train.preemption).
"""
from __future__ import annotations

import time


class CheckpointCadence:
    def __init__(self, ckpt_every: int, ckpt_minutes: float, total_steps: int, clock=time.monotonic):
        self.every, self.seconds, self.total = int(ckpt_every), 60.0 * float(ckpt_minutes), int(total_steps)
        self.clock = clock
        self.last = clock()

    def by_steps(self, done: int) -> bool:
        return self.every > 0 and done % self.every == 0 and done < self.total

    def by_time(self, done: int) -> bool:
        """This rank's proposal (only rank 0's counts)."""
        return self.seconds > 0 and done < self.total and self.clock() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = self.clock()
