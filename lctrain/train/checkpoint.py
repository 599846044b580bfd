"""Checkpoints with torch.distributed.checkpoint (DCP), written so that a crash never corrupts one.

Layout under `out_dir/ckpt/`:

    step_<n>/            one finished checkpoint
        .metadata, *.distcp   DCP: {"model": ..., "optim": ...} (per model-parallel rank, see below)
        rank<r>.pt       per-rank state: data-loader state, RNG states
        trainer.json     step, LR-scheduler state, world sizes
        config.yaml      the resolved config of the run
    latest               text file holding the name of the newest finished checkpoint ("step_<n>")

Every rank writes into `step_<n>.tmp`; after a barrier global rank 0 renames it to `step_<n>` and
then replaces `latest` (write to a temporary file + os.replace). A crash at any point leaves the
previous `latest` pointing at a complete checkpoint; a stale `.tmp` is removed by the next save.

Model and optimizer states go through `torch.distributed.checkpoint.state_dict` (FQN keys).
With tensor/pipeline parallelism > 1 the ranks hold different shards under the same parameter names,
so their states are stored under a key naming the model-parallel rank (`mp_tp<i>_pp<j>`); such a
checkpoint resumes only with the same tp/pp. Data- and context-parallel replicas hold identical
copies, which DCP de-duplicates.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

LATEST = "latest"
# model-section keys that change how the model runs, not which parameters it has
RUNTIME_MODEL_KEYS = ("kernel_backend", "activation_checkpointing", "checkpoint_offload", "mlp_chunk_tokens", "residual_dtype",
                      "checkpoint_activations")  # the last: the boolean that activation_checkpointing replaced


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and what to do."""


def ckpt_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "ckpt"


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A finished checkpoint dir from: a step dir, a `latest` file, a ckpt/ dir, or a run's out_dir."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == LATEST:
        return resolve_checkpoint(p.parent / p.read_text().strip())
    if p.is_dir():
        if (p / ".metadata").is_file() and (p / "config.yaml").is_file():
            return p
        if (p / LATEST).is_file():
            return resolve_checkpoint(p / LATEST)
        if (p / "ckpt" / LATEST).is_file():
            return resolve_checkpoint(p / "ckpt" / LATEST)
    raise CheckpointError(
        f"{str(path)!r} is not a checkpoint: pass a run's out_dir, its ckpt/ folder, ckpt/latest or a ckpt/step_<n> folder"
    )


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The finished checkpoint `out_dir/ckpt/latest` points to, or None when there is none."""
    pointer = ckpt_root(out_dir) / LATEST
    if not pointer.is_file():
        return None
    return resolve_checkpoint(pointer)


def _mp_key(tp_rank: int, pp_rank: int, tp: int, pp: int) -> str | None:
    return None if tp * pp == 1 else f"mp_tp{tp_rank}_pp{pp_rank}"


def _app_state(model, optimizer, mp_key: str | None) -> dict[str, Any]:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state if mp_key is None else {mp_key: state}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    model,
    optimizer,
    scheduler=None,
    loader=None,
    cfg: DictConfig,
    tp_rank: int = 0,
    pp_rank: int = 0,
) -> Path:
    """Collective over all ranks: write `out_dir/ckpt/step_<step>` and point `latest` at it."""
    root = ckpt_root(out_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over by a crashed save
        tmp.mkdir()
    _barrier()

    mp_key = _mp_key(tp_rank, pp_rank, cfg.parallel.tp, cfg.parallel.pp)
    dcp.save(_app_state(model, optimizer, mp_key), checkpoint_id=str(tmp))
    torch.save(
        {"loader": loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None, "rng": _rng_state()},
        tmp / f"rank{rank}.pt",
    )
    if rank == 0:
        trainer = {
            "step": step,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "world_size": dist.get_world_size() if _is_dist() else 1,
            "mp_keys": mp_key is not None,
        }
        # lambdas are not JSON; the schedule is rebuilt from the config, only its counters matter
        if trainer["scheduler"] is not None:
            trainer["scheduler"] = {k: v for k, v in trainer["scheduler"].items() if k != "lr_lambdas"}
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        OmegaConf.save(cfg, tmp / "config.yaml")
    _barrier()  # every rank's files are in tmp

    if rank == 0:
        old = root / f"step_{step}.old"
        if final.exists():  # re-saving the same step: keep it until the new one is in place
            os.replace(final, old)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        if old.exists():
            shutil.rmtree(old)
        _write_atomic(Path(out_dir) / "config.yaml", OmegaConf.to_yaml(cfg))
    _barrier()
    return final


def _model_section(cfg: DictConfig) -> dict:
    section = OmegaConf.to_container(cfg.model, resolve=True)
    for key in RUNTIME_MODEL_KEYS:
        section.pop(key, None)
    return section


def check_same_model(saved_cfg: DictConfig, cfg: DictConfig, where: Path) -> None:
    saved, current = _model_section(saved_cfg), _model_section(cfg)
    if saved != current:
        diffs = [f"model.{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        raise CheckpointError(
            f"cannot resume from {where}: the model differs from the saved one ({'; '.join(diffs)}); "
            "restore those values, use a new train.out_dir, or set train.resume=false"
        )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model,
    optimizer,
    scheduler=None,
    loader=None,
    cfg: DictConfig,
    tp_rank: int = 0,
    pp_rank: int = 0,
) -> int:
    """Collective: restore everything `save_checkpoint` wrote into live objects; returns the step."""
    ckpt = resolve_checkpoint(path)
    saved_cfg = OmegaConf.load(ckpt / "config.yaml")
    check_same_model(saved_cfg, cfg, ckpt)
    trainer = json.loads((ckpt / "trainer.json").read_text())
    world = dist.get_world_size() if _is_dist() else 1
    if trainer["world_size"] != world:
        raise CheckpointError(
            f"cannot resume from {ckpt}: it was written by {trainer['world_size']} processes, this run has {world}; "
            "resume with the same parallel layout or use a new train.out_dir"
        )
    for key in ("tp", "pp"):
        if saved_cfg.parallel[key] != cfg.parallel[key]:
            raise CheckpointError(f"cannot resume from {ckpt}: parallel.{key} was {saved_cfg.parallel[key]}, now {cfg.parallel[key]}; keep it")

    mp_key = _mp_key(tp_rank, pp_rank, cfg.parallel.tp, cfg.parallel.pp)
    state = _app_state(model, optimizer, mp_key)
    dcp.load(state, checkpoint_id=str(ckpt))
    inner = state if mp_key is None else state[mp_key]
    set_model_state_dict(model, inner["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, inner["optim"])
    if scheduler is not None and trainer.get("scheduler"):
        sched = scheduler.state_dict()
        sched.update({k: v for k, v in trainer["scheduler"].items() if k != "lr_lambdas"})
        scheduler.load_state_dict(sched)
    per_rank = torch.load(ckpt / f"rank{_rank()}.pt", weights_only=False)
    if loader is not None and per_rank["loader"] is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(per_rank["loader"])
    _set_rng_state(per_rank["rng"])
    return int(trainer["step"])


def load_model_for_eval(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """-> (model, cfg): the trained HybridLM in eval mode on `device`, from a checkpoint.

    `ckpt_dir` may be a run's out_dir, its ckpt/ folder, ckpt/latest or a step folder. Single
    process: needs no torch.distributed initialisation (DCP loads with no_dist=True). Only
    checkpoints written with parallel.tp = parallel.pp = 1 are supported here.
    """
    from lctrain.models import build_model

    ckpt = resolve_checkpoint(ckpt_dir)
    cfg = OmegaConf.load(ckpt / "config.yaml")
    if cfg.parallel.tp * cfg.parallel.pp != 1:
        raise CheckpointError(f"{ckpt} was written with tp={cfg.parallel.tp}, pp={cfg.parallel.pp}; load_model_for_eval needs tp=pp=1 checkpoints")
    model = build_model(cfg.model, cp_group=None, max_position=int(cfg.data.seq_len))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg
