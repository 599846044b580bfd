"""The device mesh: torch.distributed + megatron-core ``parallel_state`` (TP x CP x DP x PP groups).

``init_mesh(parallel_cfg, device)`` is the one entry point every job calls before building a model:

- under ``torchrun`` (RANK / WORLD_SIZE / MASTER_ADDR in the environment) it joins that world with
  ``init_method="env://"``; otherwise it starts a one-process world through a FileStore in a fresh
  temporary directory, so single-process runs and tests take the same code path;
- if torch.distributed is already initialised (by a test harness, say) it reuses that world and
  leaves it alone at ``destroy_mesh()``;
- then megatron-core ``initialize_model_parallel(tp, pp, context_parallel_size=cp)`` builds the groups.

Calling it again with the same sizes is a no-op; with other sizes it raises (call ``destroy_mesh()``
first). The query helpers (``cp_rank()`` ...) answer for a one-process world when no mesh exists, so
plain single-process code can call them unconditionally.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class MeshInfo:
    """What ``init_mesh`` set up: sizes and this process's coordinates."""
    world_size: int
    rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    backend: str


_mesh: MeshInfo | None = None
_owns_process_group = False  # True when init_mesh created the default group (then destroy_mesh ends it)
_store_dir: str | None = None


def _get(cfg: Any, key: str, default):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _positive_int(cfg: Any, key: str) -> int:
    value = _get(cfg, key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"parallel.{key} must be an integer >= 1, got {value!r}; use 1 to switch it off")
    return value


def _pick_backend(requested: str, device: torch.device) -> str:
    if requested not in ("auto", "nccl", "gloo"):
        raise ValueError(f"parallel.dist_backend={requested!r} is unknown; use auto, nccl or gloo")
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ValueError("parallel.dist_backend=nccl needs CUDA tensors; use gloo (or auto) on CPU")
    return requested


def init_mesh(parallel_cfg: Any = None, device: torch.device | str | None = None,
              timeout_s: float = 1800.0) -> MeshInfo:
    """Initialise torch.distributed (if needed) and megatron-core's model-parallel groups.

    ``parallel_cfg`` is the config's ``parallel`` section (or any object / dict with ``tp``, ``pp``,
    ``cp`` and optionally ``dist_backend``); missing keys mean 1 / "auto". ``device`` decides the
    backend under "auto" (nccl on CUDA, gloo otherwise); on CUDA under torchrun the process binds to
    ``cuda:LOCAL_RANK``. Returns a ``MeshInfo``.
    """
    global _mesh, _owns_process_group, _store_dir
    tp, pp, cp = (_positive_int(parallel_cfg, key) for key in ("tp", "pp", "cp"))
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = _pick_backend(str(_get(parallel_cfg, "dist_backend", "auto")), device)

    if _mesh is not None:
        if (_mesh.tp, _mesh.pp, _mesh.cp) == (tp, pp, cp):
            return _mesh
        raise RuntimeError(f"init_mesh: a mesh with tp={_mesh.tp} pp={_mesh.pp} cp={_mesh.cp} already exists; "
                           f"call destroy_mesh() before asking for tp={tp} pp={pp} cp={cp}")

    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        if all(v in os.environ for v in _TORCHRUN_VARS):
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        else:
            if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
                missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
                raise RuntimeError(f"init_mesh: WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; "
                                   "launch with torchrun (or `lctrain train`, which launches it for you)")
            _store_dir = tempfile.mkdtemp(prefix="lctrain_store_")
            store = dist.FileStore(os.path.join(_store_dir, "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        _owns_process_group = True

    world, rank = dist.get_world_size(), dist.get_rank()
    model_size = tp * pp * cp
    if world % model_size:
        if _owns_process_group:
            _end_process_group()
        raise ValueError(f"init_mesh: world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_size}; "
                         f"launch a multiple of {model_size} processes (e.g. torchrun --nproc-per-node {model_size}) "
                         "or lower parallel.tp / parallel.pp / parallel.cp")

    from megatron.core import parallel_state as ps  # heavy import, only when a mesh is built

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    _mesh = MeshInfo(world_size=world, rank=rank, tp=tp, pp=pp, cp=cp, dp=world // model_size, backend=backend)
    return _mesh


def _end_process_group() -> None:
    global _owns_process_group, _store_dir
    if dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False
    if _store_dir is not None:
        shutil.rmtree(_store_dir, ignore_errors=True)
        _store_dir = None


def destroy_mesh() -> None:
    """Tear down megatron-core's groups, and the default process group if ``init_mesh`` created it."""
    global _mesh
    if _mesh is not None:
        from megatron.core import parallel_state as ps
        ps.destroy_model_parallel()
        _mesh = None
    if _owns_process_group:
        _end_process_group()


def mesh_info() -> MeshInfo | None:
    """The current mesh, or None before ``init_mesh``."""
    return _mesh


def _ps():
    if _mesh is None:
        return None
    from megatron.core import parallel_state as ps
    return ps


# --------------------------------------------------------------------------------------- queries

def group_size(group) -> int:
    """Ranks in `group`; None (the "no group" every CP/TP op accepts) counts as 1."""
    return 1 if group is None else dist.get_world_size(group)


def cp_group():
    """The context-parallel process group of this rank, or None when there is no CP (cp == 1 or no
    mesh): every CP op treats None as "the whole sequence is local"."""
    ps = _ps()
    if ps is None or _mesh.cp == 1:
        return None
    return ps.get_context_parallel_group()


def cp_rank() -> int:
    ps = _ps()
    return 0 if ps is None else ps.get_context_parallel_rank()


def cp_size() -> int:
    ps = _ps()
    return 1 if ps is None else ps.get_context_parallel_world_size()


def tp_group():
    """The tensor-parallel group, or None when tp == 1 or no mesh."""
    ps = _ps()
    if ps is None or _mesh.tp == 1:
        return None
    return ps.get_tensor_model_parallel_group()


def tp_rank() -> int:
    ps = _ps()
    return 0 if ps is None else ps.get_tensor_model_parallel_rank()


def tp_size() -> int:
    ps = _ps()
    return 1 if ps is None else ps.get_tensor_model_parallel_world_size()


def dp_rank() -> int:
    """Data-parallel rank (CP ranks of one sequence share it: they read the same sample)."""
    ps = _ps()
    return 0 if ps is None else ps.get_data_parallel_rank()


def dp_size() -> int:
    ps = _ps()
    return 1 if ps is None else ps.get_data_parallel_world_size()


def dp_cp_group():
    """The group over which parameter gradients are summed/averaged: data x context parallel.

    Always a real group once the mesh exists (size 1 included, so callers need no special case);
    None without a mesh."""
    ps = _ps()
    return None if ps is None else ps.get_data_parallel_group(with_context_parallel=True)


def dp_cp_size() -> int:
    ps = _ps()
    return 1 if ps is None else ps.get_data_parallel_world_size(with_context_parallel=True)


def pp_group():
    """The pipeline-parallel group (this rank's stages, first to last), or None when pp == 1 or no mesh."""
    ps = _ps()
    if ps is None or _mesh.pp == 1:
        return None
    return ps.get_pipeline_model_parallel_group()


def pp_rank() -> int:
    """This rank's pipeline stage (0 = the one holding the embedding)."""
    ps = _ps()
    return 0 if ps is None else ps.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    ps = _ps()
    return 1 if ps is None else ps.get_pipeline_model_parallel_world_size()


def embedding_group():
    """Under pp > 1 on the first and the last stage: the group of those two ranks (same tp / cp / dp
    position), over which a tied embedding's two copies sum their gradients; None elsewhere."""
    ps = _ps()
    if ps is None or _mesh.pp == 1 or not ps.is_rank_in_embedding_group(ignore_virtual=True):
        return None
    return ps.get_embedding_group()


def is_main() -> bool:
    """True on global rank 0 (or when torch.distributed is not initialised)."""
    return not dist.is_initialized() or dist.get_rank() == 0
