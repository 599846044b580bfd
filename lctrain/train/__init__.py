"""Training: the `lctrain train` command and everything one rank runs.

- command.py: `lctrain train`: validate the config, then run here or start the local ranks;
- trainer.py: `Trainer` (build from the config, step, save/load, run) and `train(cfg)`;
- step.py: the CP-correct language-model loss and the answer-token weights;
- grad_comm.py: gradient all-reduce over dp x cp, global grad-norm clipping over tp;
- device.py: device, CPU threads, autocast dtype, seeds;
- metrics.py: progress bar, log lines, metrics.jsonl, tensorboard;
- optim.py, checkpoint.py: AdamW + schedule; DCP checkpoints.

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
