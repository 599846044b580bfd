"""Training: the `lctrain train` command and everything one rank runs.

- command.py: `lctrain train`: validate the config, then run here or start the local ranks;
- trainer.py: `Trainer` (build from the config, step, save/load, run) and `train(cfg)`;
- step.py: the CP-correct language-model loss and the answer-token weights;
- grad_comm.py: gradient all-reduce over dp x cp, global grad-norm clipping over tp;
- device.py: device, CPU threads, autocast dtype, seeds;
- metrics.py: progress bar, log lines, metrics.jsonl, tensorboard;
- optim.py, checkpoint.py: AdamW + schedule; DCP checkpoints.

Public names, imported lazily so that `import lctrain.train` stays cheap: `Trainer` and `train`
(trainer), `lm_loss` (step), `load_model_for_eval` (checkpoint).
"""
from __future__ import annotations

_PUBLIC = {
    "Trainer": "lctrain.train.trainer",
    "train": "lctrain.train.trainer",
    "lm_loss": "lctrain.train.step",
    "load_model_for_eval": "lctrain.train.checkpoint",
}


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lctrain.train' has no attribute {name!r}")
