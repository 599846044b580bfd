"""Training: `lctrain train` (launch), the loop, the CP-correct loss, checkpoints, optimizer.

Public helpers: `lm_loss` (step), `load_model_for_eval` (checkpoint). Imported lazily so that
`import lctrain.train` stays cheap.
"""
from __future__ import annotations


def __getattr__(name):
    if name == "lm_loss":
        from lctrain.train.step import lm_loss

        return lm_loss
    if name == "load_model_for_eval":
        from lctrain.train.checkpoint import load_model_for_eval

        return load_model_for_eval
    raise AttributeError(f"module 'lctrain.train' has no attribute {name!r}")
