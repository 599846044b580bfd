"""`lctrain eval task --ckpt RUN`: accuracy on a synthetic task (MQAR, swap tracking, DAG reachability).

The samples are held-out draws of the task the run trained on (its data.source=synthetic:<task> and
data.task knobs, at its data.seq_len), or of another task / other knobs given on the command line
(`--task mqar --num-pairs 64 --length 512`). Every answer is one token, scored teacher-forced: the
model's argmax at the position before the answer must be the answer (earlier answers of the same
sample are in the input, as in training; Zoology's MQAR protocol). Accuracy = share of answers right.
Writes `<out>/task_<task>.json` (default out: <run out_dir>/eval).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from lctrain.data.synthetic import TASK_KNOBS, TASKS


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lctrain eval task", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a run's out_dir, its ckpt/ folder or a ckpt/step_<n> folder")
    p.add_argument("--task", choices=sorted(TASKS), help="default: the run's data.source=synthetic:<task>")
    p.add_argument("--length", type=int, help="tokens the model reads per sample (the sample holds one more, the "
                   "last answer); default: the run's data.seq_len")
    for knob in sorted({k for ks in TASK_KNOBS.values() for k in ks}):
        p.add_argument("--" + knob.replace("_", "-"), type=int, help="default: the run's data.task." + knob)
    p.add_argument("--samples", type=int, default=256, help="samples to score (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, help="sample seed (default: eval.seed of the run)")
    p.add_argument("--out", help="output folder (default: <run out_dir>/eval)")
    p.add_argument("args", nargs="*", help="key=value overrides (train.device, model.kernel_backend)")
    return p.parse_args(argv)


def task_from(cfg, ns: argparse.Namespace) -> tuple[str, dict, int]:
    """(task, knobs, length) from the command line, falling back to the run's data settings."""
    from lctrain.data.task_dataset import task_knobs, task_name

    from .runtime import EvalError

    trained = task_name(str(cfg.data.source))
    name = ns.task or trained
    if name is None:
        raise EvalError(f"the run trained on data.source={cfg.data.source!r}, not a synthetic task; pass --task "
                        f"({', '.join(sorted(TASKS))}) and its knobs")
    knobs = task_knobs(name, cfg.data.task) if name == trained else {"vocab_size": int(cfg.data.task.vocab_size)}
    for knob in {k for ks in TASK_KNOBS.values() for k in ks}:
        value = getattr(ns, knob)
        if value is None:
            continue
        if knob not in TASK_KNOBS[name]:
            raise EvalError(f"--{knob.replace('_', '-')} is not a knob of the {name} task (it takes "
                            f"{', '.join('--' + k.replace('_', '-') for k in TASK_KNOBS[name])})")
        knobs[knob] = int(value)
    length = int(ns.length or cfg.data.seq_len)
    if knobs["vocab_size"] > int(cfg.model.vocab_size):
        raise EvalError(f"the task's ids reach {knobs['vocab_size']} but the model's vocabulary is "
                        f"{cfg.model.vocab_size}")
    return name, knobs, length


@torch.no_grad()
def task_accuracy(model, samples, *, device, batch_size: int = 16, autocast_dtype=None) -> dict:
    """{"correct", "total", "accuracy"} of teacher-forced argmax on the samples' answer tokens."""
    correct = total = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        ids = torch.as_tensor(np.stack([s.ids for s in chunk]), device=device)
        mask = torch.as_tensor(np.stack([s.answer_mask for s in chunk]), device=device).bool()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(ids[:, :-1])
        pred = logits.argmax(-1)
        target, where = ids[:, 1:], mask[:, 1:]
        correct += int((pred == target)[where].sum())
        total += int(where.sum())
    return {"correct": correct, "total": total, "accuracy": correct / max(total, 1)}


def main(argv: list[str]) -> int:
    ns = _parse(argv)
    from lctrain.config import ConfigError
    from lctrain.data.synthetic import TaskError
    from lctrain.data.task_dataset import eval_samples

    from . import runtime

    try:
        cfg = runtime.eval_config(ns.ckpt, None, list(ns.args))
        if cfg.parallel.cp != 1:
            raise runtime.EvalError("the task eval runs on one process; pass parallel.cp=1")
        name, knobs, length = task_from(cfg, ns)
        if ns.samples < 1 or ns.batch_size < 1:
            raise runtime.EvalError("--samples and --batch-size must be >= 1")
        seed = ns.seed if ns.seed is not None else int(cfg.eval.seed)
        samples = eval_samples(name, knobs, length=length + 1, count=ns.samples, seed=seed)
    except (ConfigError, TaskError, ValueError) as err:
        print(f"lctrain eval task: error: {err}", file=sys.stderr)
        return 2
    ctx = runtime.start(cfg)
    try:
        model, _, _, path = runtime.load_models(ns.ckpt, ctx, cfg)
        result = task_accuracy(model, samples, device=ctx.device, batch_size=ns.batch_size,
                               autocast_dtype=ctx.autocast_dtype)
    finally:
        runtime.stop()
    report = {"checkpoint": str(path), "label": runtime.checkpoint_label(path), "task": name, "knobs": knobs,
              "length": length, "samples": ns.samples, "seed": seed,
              "metric": "teacher-forced argmax accuracy on the answer tokens", **result}
    out = Path(ns.out) if ns.out else runtime.default_out_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"task_{name}.json"
    json_path.write_text(json.dumps(report, indent=1))
    print(f"lctrain eval task: {report['label']} {name} {knobs} length {length}: accuracy "
          f"{100 * result['accuracy']:.1f}% ({result['correct']}/{result['total']}); wrote {json_path}", flush=True)
    return 0
