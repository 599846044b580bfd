"""Checkpoints with torch.distributed.checkpoint (DCP), written so that a crash never corrupts one.

Layout under `out_dir/ckpt/`:

    step_<n>/            one finished checkpoint
        .metadata, *.distcp   DCP: {"model": ..., "optim": ...}, full (unsharded) tensors
        rank<r>.pt       per-rank state: data-loader state, RNG states, data-parallel rank
        trainer.json     step, LR-scheduler state, world and data-parallel sizes
        config.yaml      the resolved config of the run
        manifest.json    size and sha256 of every file above, written last
    latest               text file holding the name of the newest finished checkpoint ("step_<n>")

Every rank writes into `step_<n>.tmp`; after a barrier global rank 0 hashes the files into
`manifest.json`, renames the folder to `step_<n>` and then replaces `latest` (write to a temporary
file + os.replace). A crash at any point leaves the previous `latest` pointing at a complete
checkpoint; a stale `.tmp` is removed by the next save. Only then are checkpoints older than the
newest `train.keep_last` removed, so a complete one always exists. A checkpoint is never written
"back in time": saving step n while a finished step m > n exists is refused.

Loading verifies the manifest: resume and the evals take the newest checkpoint that verifies
(`find_checkpoint`), warning about every newer one that does not (flipped bytes, a truncated shard,
an empty or dangling `latest`).

Model and optimizer states go through `torch.distributed.checkpoint.state_dict` (FQN keys), with
every tensor-parallel shard gathered to its full tensor first (`tensor_parallel.full_state_dict`);
the optimizer's state is stored per parameter name ({"step", "exp_avg", "exp_avg_sq"}), gathered
from the replica that owns it under ZeRO-1 (train.shard_optimizer), so sharded and unsharded runs
resume from each other:
the checkpoint is the one-process model's state, whatever the (tp, cp, dp) layout that wrote it, so
any layout resumes from it (each rank loads the full tensors and keeps its shards) and evals load it
in one process. Replicas write identical tensors, which DCP de-duplicates. The price: each rank
holds the full tensors of the model and Adam state once while saving / loading.

`load_model_weights` (train.init_from) loads only the model weights into a new run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    set_model_state_dict,
)

from lctrain.errors import UserError

LATEST = "latest"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# model-section keys that change how the model runs, not which parameters it has
RUNTIME_MODEL_KEYS = ("kernel_backend", "activation_checkpointing", "checkpoint_offload", "mlp_chunk_tokens",
                      "residual_dtype",
                      "checkpoint_activations")  # the last: the boolean that activation_checkpointing replaced
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class CheckpointError(UserError, RuntimeError):
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
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _warn(text: str) -> None:
    print(f"lctrain: warning: {text}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _file_record(p: Path) -> dict:
    return {"size": p.stat().st_size, "sha256": _sha256(p)}


def hash_own_files(ckpt: Path, rank: int) -> dict[str, dict]:
    """Size and sha256 of the files this rank wrote (DCP names its data files `__<rank>_<n>.distcp`),
    so that the ranks share the hashing of a large checkpoint."""
    own = [p for p in ckpt.iterdir() if p.is_file() and (p.name == f"rank{rank}.pt" or p.name.startswith(f"__{rank}_"))]
    return {p.name: _file_record(p) for p in own}


def write_manifest(ckpt: Path, known: dict[str, dict] | None = None) -> None:
    """Record size and sha256 of every file of the (complete) checkpoint folder, atomically; `known`
    holds records the other ranks computed already, the rest is hashed here."""
    known = known or {}
    files = {}
    for p in sorted(ckpt.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(MANIFEST + ".tmp"):
            files[p.name] = known.get(p.name) or _file_record(p)
    _write_atomic(ckpt / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True))


def verify_checkpoint(ckpt: str | os.PathLike) -> str | None:
    """None when every file the manifest lists is there with its size and sha256; else what is wrong."""
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish, or an lctrain version without integrity checks wrote it)"
    except (ValueError, KeyError, TypeError, OSError) as err:
        return f"unreadable {MANIFEST} ({type(err).__name__})"
    for name in (".metadata", "trainer.json", "config.yaml"):
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, want in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{name} holds {size} bytes, the manifest says {want['size']} (truncated or rewritten)"
        if _sha256(p) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (the bytes changed)"
    return None


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def finished_steps(root: Path) -> list[Path]:
    """The `step_<n>` folders under ckpt/ (renamed into place, so not partial writes), newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(dirs, key=step_of, reverse=True)


def find_checkpoint(root: Path, warn=_warn, quarantine: bool = False) -> Path | None:
    """The newest `step_<n>` under `root` (a ckpt/ folder) that verifies; `warn` names each newer one
    that does not, and a `latest` that is empty or points elsewhere. None when there is no checkpoint;
    CheckpointError (saying what is damaged, no separate warnings) when there are some and none verifies.

    quarantine (training only): rename each damaged one to `step_<n>.damaged`, so that it is neither
    resumed from nor counted by keep_last again, but is still there to inspect."""
    pointer = root / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    notes, bad = [], []
    if named == "":
        notes.append(f"{pointer} is empty")
    for ckpt in finished_steps(root):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            if named and named != ckpt.name and named not in {p.name for p in bad}:
                notes.append(f"{pointer} names {named!r}, but the newest checkpoint that verifies is {ckpt.name}")
            for note in notes:
                warn(f"{note}; using {ckpt}")
            return ckpt
        bad.append(ckpt)
        notes.append(f"checkpoint {ckpt} is damaged: {problem}")
        if quarantine:
            moved = ckpt.with_name(ckpt.name + ".damaged")
            shutil.rmtree(moved, ignore_errors=True)
            os.replace(ckpt, moved)
            notes[-1] += f" (moved to {moved.name})"
    if bad:
        raise CheckpointError(
            f"no checkpoint under {root} verifies ({'; '.join(notes)}); "
            "delete the damaged ones to start over, or use a new train.out_dir"
        )
    return None


def resolve_checkpoint(path: str | os.PathLike, warn=_warn) -> Path:
    """A verified checkpoint dir from: a step dir, a `latest` file, a ckpt/ dir, or a run's out_dir.
    For all but a step dir, the newest checkpoint that verifies (see find_checkpoint)."""
    p = Path(path).expanduser()
    if p.is_dir() and step_of(p) is not None or (p / ".metadata").is_file():
        problem = verify_checkpoint(p)
        if problem is not None:
            raise CheckpointError(f"checkpoint {p} is damaged: {problem}; pass the run's out_dir to use its newest "
                                  "good checkpoint")
        return p
    root = None
    if p.is_file() and p.name == LATEST:
        root = p.parent
    elif p.is_dir() and ((p / LATEST).is_file() or finished_steps(p)):
        root = p
    elif p.is_dir() and (p / "ckpt").is_dir():
        root = p / "ckpt"
    found = find_checkpoint(root, warn) if root is not None else None
    if found is None:
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint: pass a run's out_dir, its ckpt/ folder, ckpt/latest or a "
            "ckpt/step_<n> folder"
        )
    return found


def latest_checkpoint(out_dir: str | os.PathLike, warn=_warn, quarantine: bool = False) -> Path | None:
    """The newest checkpoint of the run that verifies, or None when it has none (see find_checkpoint).

    Under torch.distributed rank 0 looks (and warns) and every rank gets its answer, so that all
    resume from the same one."""
    if not _is_dist() or dist.get_world_size() == 1:
        return find_checkpoint(ckpt_root(out_dir), warn, quarantine)
    answer: list = [None]
    if _rank() == 0:
        try:
            found = find_checkpoint(ckpt_root(out_dir), warn, quarantine)
            answer[0] = ("ok", None if found is None else str(found))
        except CheckpointError as err:
            answer[0] = ("error", str(err))
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise CheckpointError(value)
    return None if value is None else Path(value)


def check_not_back_in_time(out_dir: str | os.PathLike, step: int) -> None:
    """Refuse to write step `step` when a later finished checkpoint exists (it would rewrite history)."""
    newer = [p for p in finished_steps(ckpt_root(out_dir)) if step_of(p) > step]
    if newer:
        raise CheckpointError(
            f"{newer[0]} is newer than step {step}: writing step_{step} now would go back in time; "
            f"raise train.steps above {step_of(newer[0])} to continue that run, or use a new train.out_dir"
        )


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int, newest: Path) -> list[Path]:
    """Delete finished checkpoints older than the newest `keep_last` (0 keeps all); `newest` (just
    completed) is always kept. Returns what was deleted."""
    if keep_last <= 0:
        return []
    older = [p for p in finished_steps(ckpt_root(out_dir)) if step_of(p) < step_of(newest)]
    doomed = older[max(keep_last - 1, 0):]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _state_holder(optimizer):
    """(the optimizer holding Adam state, {param id: global rank owning it} or None): under ZeRO-1
    (ZeroRedundancyOptimizer) each replica holds the state of its own share of the parameters."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        group = optimizer.process_group
        return optimizer.optim, {id(p): dist.get_global_rank(group, r) for p, r in optimizer._param_to_rank.items()}
    return optimizer, None


def _full_optim_state(model, optimizer, tp_group) -> dict:
    """{parameter name: {"step", "exp_avg", "exp_avg_sq"}}, full tensors (TP-gathered; under ZeRO-1
    broadcast from the replica owning them); zeros and step 0 for a parameter not stepped yet."""
    from lctrain.parallel.tensor_parallel import gather_full, split_dims

    holder, owners = _state_holder(optimizer)
    dims = split_dims(model)
    out = {}
    for name, p in model.named_parameters():
        st = holder.state.get(p) or {}
        entry = {"step": torch.tensor(float(st["step"]) if "step" in st else 0.0),
                 **{k: st[k].detach().clone() if k in st else torch.zeros_like(p, memory_format=torch.contiguous_format)
                    for k in _ADAM_KEYS}}
        if owners is not None:
            for t in entry.values():
                dist.broadcast(t, src=owners[id(p)], group=optimizer.process_group)
        if name in dims:
            entry.update({k: gather_full(entry[k], dims[name], tp_group) for k in _ADAM_KEYS})
        out[name] = entry
    return out


def _set_optim_state(model, optimizer, full: dict, tp_group) -> None:
    """The inverse of `_full_optim_state`: this rank's shards into the optimizer (under ZeRO-1 only
    the parameters this replica owns)."""
    from lctrain.parallel.tensor_parallel import split_dims, take_shard

    holder, owners = _state_holder(optimizer)
    dims = split_dims(model)
    rank = _rank()
    for name, p in model.named_parameters():
        entry = full[name]
        if owners is not None and owners[id(p)] != rank:
            continue
        if float(entry["step"]) == 0:
            holder.state.pop(p, None)
            continue
        shard = (lambda t, name=name: take_shard(t, dims[name], tp_group)) if name in dims else (lambda t: t)
        holder.state[p] = {"step": entry["step"].clone().float(),
                           **{k: shard(entry[k]).to(device=p.device, dtype=p.dtype).clone() for k in _ADAM_KEYS}}


def _app_state(model, optimizer, tp_group=None) -> dict[str, Any]:
    """{"model", "optim"}: the full (TP-gathered) states, the same whatever the layout."""
    from lctrain.parallel.tensor_parallel import full_state_dict

    state = {"model": full_state_dict(model, get_model_state_dict(model), tp_group)}
    if optimizer is not None:
        state["optim"] = _full_optim_state(model, optimizer, tp_group)
    return state


def _shard_model_state(model, state: dict, tp_group=None) -> dict:
    from lctrain.parallel.tensor_parallel import split_dims, take_shard

    dims = split_dims(model)
    return {k: take_shard(v, dims[k], tp_group) if k in dims else v for k, v in state.items()}


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
    tp_group=None,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> Path:
    """Collective over all ranks: write `out_dir/ckpt/step_<step>` and point `latest` at it."""
    root = ckpt_root(out_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    rank = _rank()
    check_not_back_in_time(out_dir, step)  # every rank sees the same folder: all refuse together
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over by a crashed save
        tmp.mkdir()
    _barrier()

    dcp.save(_app_state(model, optimizer, tp_group), checkpoint_id=str(tmp))
    torch.save(
        {"loader": loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None,
         "rng": _rng_state(),
         "dp_rank": dp_rank},
        tmp / f"rank{rank}.pt",
    )
    if rank == 0:
        trainer = {
            "step": step,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "world_size": dist.get_world_size() if _is_dist() else 1,
            "dp_size": dp_size,
            "layout": {k: int(cfg.parallel[k]) for k in ("tp", "cp", "pp")},
        }
        # lambdas are not JSON; the schedule is rebuilt from the config, only its counters matter
        if trainer["scheduler"] is not None:
            trainer["scheduler"] = {k: v for k, v in trainer["scheduler"].items() if k != "lr_lambdas"}
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        OmegaConf.save(cfg, tmp / "config.yaml")
    hashes = [hash_own_files(tmp, rank)]
    if _is_dist() and dist.get_world_size() > 1:  # also the barrier: every rank's files are in tmp
        hashes = [None] * dist.get_world_size()
        dist.all_gather_object(hashes, hash_own_files(tmp, rank))

    if rank == 0:
        write_manifest(tmp, {name: rec for part in hashes for name, rec in part.items()})
        old = root / f"step_{step}.old"
        if final.exists():  # re-saving the same step: keep it until the new one is in place
            os.replace(final, old)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        if old.exists():
            shutil.rmtree(old)
        _write_atomic(Path(out_dir) / "config.yaml", OmegaConf.to_yaml(cfg))
        prune_checkpoints(out_dir, int(cfg.train.get("keep_last", 0) or 0), final)
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
        diffs = [f"model.{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
                 for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        raise CheckpointError(
            f"cannot resume from {where}: the model differs from the saved one ({'; '.join(diffs)}); "
            "restore those values, use a new train.out_dir, or set train.resume=false"
        )


def _rank_file(ckpt: Path, trainer: dict, dp_rank: int, dp_size: int) -> Path:
    """The per-rank file to restore this rank's loader position and RNGs from: its own when the
    world is unchanged, else one written by a rank of the same data-parallel rank (any rank when
    the data-parallel size changed: the streaming loader's position is global, its RNGs are not used)."""
    own = ckpt / f"rank{_rank()}.pt"
    if trainer["world_size"] == (dist.get_world_size() if _is_dist() else 1):
        return own
    if trainer.get("dp_size", trainer["world_size"]) == dp_size:
        for r in range(trainer["world_size"]):
            path = ckpt / f"rank{r}.pt"
            if torch.load(path, weights_only=False).get("dp_rank", r) == dp_rank:
                return path
    return ckpt / "rank0.pt"


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model,
    optimizer,
    scheduler=None,
    loader=None,
    cfg: DictConfig,
    tp_group=None,
    dp_rank: int = 0,
    dp_size: int = 1,
    verified: bool = False,
) -> int:
    """Collective: restore everything `save_checkpoint` wrote into live objects; returns the step.
    The checkpoint may come from any (tp, cp, dp) layout (module doc). `verified=True` skips the
    manifest check for a path `latest_checkpoint` has just verified."""
    ckpt = Path(path) if verified else resolve_checkpoint(path)
    saved_cfg = OmegaConf.load(ckpt / "config.yaml")
    check_same_model(saved_cfg, cfg, ckpt)
    trainer = json.loads((ckpt / "trainer.json").read_text())
    if "mp_keys" in trainer and trainer["mp_keys"]:
        raise CheckpointError(f"{ckpt} holds per-model-parallel-rank states (an older format); resume it with its own "
                              "tp/pp")

    state = _app_state(model, optimizer, tp_group)  # full-size templates (their values are replaced)
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(model, _shard_model_state(model, state["model"], tp_group))
    if optimizer is not None:
        _set_optim_state(model, optimizer, state["optim"], tp_group)
    if scheduler is not None and trainer.get("scheduler"):
        sched = scheduler.state_dict()
        sched.update({k: v for k, v in trainer["scheduler"].items() if k != "lr_lambdas"})
        scheduler.load_state_dict(sched)
        if optimizer is not None:  # the LR the next step uses (the optimizer's hyper-parameters are not stored)
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
    per_rank = torch.load(_rank_file(ckpt, trainer, dp_rank, dp_size), weights_only=False)
    if loader is not None and per_rank["loader"] is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(per_rank["loader"])
    _set_rng_state(per_rank["rng"])
    return int(trainer["step"])


def load_model_weights(path: str | os.PathLike, model, tp_group=None) -> Path:
    """Collective: only the model weights of a checkpoint (any layout) into `model` (train.init_from).
    The architecture may differ only in what does not change parameter shapes (RoPE base, say)."""
    ckpt = resolve_checkpoint(path)
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    state = _app_state(model, None, tp_group)
    for name, tensor in state["model"].items():
        meta = saved.get(f"model.{name}")
        if meta is None or not hasattr(meta, "size"):
            raise CheckpointError(f"train.init_from={str(path)!r}: the checkpoint has no weight {name!r}; "
                                  "its model.layer_pattern / architecture differs from this run's")
        if tuple(meta.size) != tuple(tensor.shape):
            raise CheckpointError(f"train.init_from={str(path)!r}: weight {name!r} has shape {tuple(meta.size)} there, "
                                  f"{tuple(tensor.shape)} here; keep the model's sizes (d_model, heads, vocab_size, "
                                  "...)")
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(model, _shard_model_state(model, state["model"], tp_group))
    return ckpt


def load_model_for_eval(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """-> (model, cfg): the trained HybridLM in eval mode on `device`, from a checkpoint.

    `ckpt_dir` may be a run's out_dir, its ckpt/ folder, ckpt/latest or a step folder. Single
    process: needs no torch.distributed initialisation (DCP loads with no_dist=True). Checkpoints
    of any parallel layout load (they hold full tensors).
    """
    from lctrain.models import build_model

    ckpt = resolve_checkpoint(ckpt_dir)
    cfg = OmegaConf.load(ckpt / "config.yaml")
    model = build_model(cfg.model, cp_group=None, max_position=int(cfg.data.seq_len))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg
