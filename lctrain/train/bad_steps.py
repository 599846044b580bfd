"""The NaN/Inf guard: a step whose loss or gradient norm is not finite changes nothing.

Such a step's gradients are dropped before the optimizer sees them (parameters and moments stay as
they were); the batch is consumed and the step counts, so the data order and the LR schedule stay
those of the step number. `train.max_bad_steps` bad steps in a row stop the run with a message
naming the step: by then the state itself is broken, not one batch.
"""
from __future__ import annotations

import math

from lctrain.errors import UserError


class TooManyBadSteps(UserError):
    """train.max_bad_steps non-finite steps in a row."""


class BadStepGuard:
    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.total = 0
        self.in_row = 0

    def is_good(self, step: int, loss: float, grad_norm: float) -> bool:
        """Call once per step (1-based `step`) with values every rank agrees on; False = skip the update."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_row = 0
            return True
        self.total += 1
        self.in_row += 1
        if self.in_row >= self.max_in_row:
            raise TooManyBadSteps(
                f"step {step}: loss {loss}, gradient norm {grad_norm}: {self.in_row} non-finite steps in a row "
                f"(train.max_bad_steps={self.max_in_row}); lower train.lr, raise train.warmup_steps or check the data "
                "(the run resumes from its last checkpoint)"
            )
        return False
