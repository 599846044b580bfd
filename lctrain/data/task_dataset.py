"""`data.source=synthetic:<task>`: a synthetic task (lctrain/data/synthetic.py) as cached MDS shards.

Built once under `<data.cache_dir>/synthetic-<task>-<hash>` (the hash covers the task, its knobs
(data.task), seq_len, seed and sample count), with the `answer_mask` column that
train.answer_loss_weight weights; built and shared across ranks like the embedded dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lctrain.data.embedded import build_once
from lctrain.data.mds import write_mds
from lctrain.data.packing import token_dtype
from lctrain.data.synthetic import DEFAULT_TASK_SAMPLES, TASK_KNOBS, TRAIN_KNOBS, task_samples

SOURCE_PREFIX = "synthetic:"
FORMAT_VERSION = 1


def task_name(source: str) -> str | None:
    """The task of a data.source `synthetic:<task>`, else None."""
    return source[len(SOURCE_PREFIX):] if source.startswith(SOURCE_PREFIX) else None


def task_knobs(name: str, task_cfg: Any, *, train: bool = False) -> dict:
    """The generator's keyword knobs from data.task (0 = the generator's default, left out). With
    `train`, also the training-only knobs (TRAIN_KNOBS, e.g. swap's min_swaps): the training dataset
    uses them, the eval does not (it scores the task as defined)."""
    names = TASK_KNOBS[name] + (TRAIN_KNOBS[name] if train else ())
    knobs = {k: int(task_cfg[k]) for k in names if int(task_cfg[k])}
    return dict(knobs, vocab_size=int(task_cfg.vocab_size))


def task_settings(data_cfg: Any) -> dict:
    name = task_name(str(data_cfg.source))
    return {"format": FORMAT_VERSION, "task": name, "knobs": task_knobs(name, data_cfg.task, train=True),
            "seq_len": int(data_cfg.seq_len), "seed": int(data_cfg.seed),
            "num_samples": int(data_cfg.task.num_samples) or DEFAULT_TASK_SAMPLES}


def task_dataset_path(data_cfg: Any) -> Path:
    settings = task_settings(data_cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.path.expanduser(str(data_cfg.cache_dir))).absolute()
    return root / f"synthetic-{settings['task']}-{digest}"


def ensure_task_dataset(data_cfg: Any, *, builder: bool | None = None, timeout_s: float = 3600.0) -> Path:
    """Local MDS path of the synthetic task dataset for `data_cfg`, built on first use."""
    s = task_settings(data_cfg)

    def write(path: Path) -> None:
        samples = task_samples(s["task"], count=s["num_samples"], length=s["seq_len"] + 1, seed=s["seed"], **s["knobs"])
        vocab = s["knobs"]["vocab_size"]
        write_mds(path, (x.ids for x in samples), answer_masks=(x.answer_mask for x in samples),
                  sample_len=s["seq_len"] + 1, dtype=token_dtype(vocab),
                  meta=dict(s, source=f"{SOURCE_PREFIX}{s['task']}", vocab_size=vocab,
                            ordered=bool(s["knobs"].get("curriculum_samples"))))

    return build_once(task_dataset_path(data_cfg), write, builder=builder, timeout_s=timeout_s)


def eval_samples(name: str, knobs: dict, *, length: int, count: int, seed: int) -> list:
    """Held-out samples for the task eval: the generator's stream for a seed the training data does
    not use (training seeds its stream with data.seed; the eval offsets it)."""
    return task_samples(name, count=count, length=length, seed=int(seed) + 1_000_003, **knobs)



