"""What both evals share: the eval config, the self-launcher, the mesh and loading checkpoints.

The parallel layout defaults to the checkpoint's own `parallel` section (the layout it was trained
with); an optional recipe YAML and `key=value` overrides change it, as for `lctrain train`. Only
`parallel.*`, `model.kernel_backend`, `train.device`, `train.dtype` and the eval-time position
scaling `model.rope.scaling` / `model.rope.factor` / `model.rope.original_max_position` /
`model.rope.rerope_window` may be overridden (the scaling rebuilds the rotary embedding of the loaded model and touches
no weight; the
original context defaults to the checkpoint's data.seq_len): the rest of the model is what the
checkpoint holds. With parallel.cp (or nproc_per_node) > 1 and no torchrun
environment, the command re-launches itself on that many local processes (torch.distributed.run),
like `lctrain train`. World = cp x dp: CP ranks share one sequence, DP groups split the work.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from lctrain.errors import UserError

OVERRIDABLE = ("parallel.", "model.kernel_backend", "train.device", "train.dtype", *(
    f"model.rope.{key}" for key in ("scaling", "factor", "original_max_position", "rerope_window")))
ROPE_EVAL_KEYS = ("scaling", "factor", "original_max_position", "rerope_window")


class EvalError(UserError, ValueError):
    """Bad eval input; the message says what to change."""


def eval_config(ckpt: str | os.PathLike, recipe: str | None, overrides: list[str]) -> DictConfig:
    """The checkpoint's config with the recipe's parallel section and the overrides applied."""
    from lctrain.config import ConfigError, default_config
    from lctrain.train.checkpoint import CheckpointError, resolve_checkpoint

    try:
        path = resolve_checkpoint(ckpt)
    except CheckpointError as err:
        raise EvalError(str(err)) from None
    cfg = OmegaConf.merge(default_config(), OmegaConf.load(path / "config.yaml"))
    if recipe is not None:
        from lctrain.config import load_recipe

        rec = load_recipe(recipe)
        if "parallel" in rec:
            cfg = OmegaConf.merge(cfg, {"parallel": rec.parallel})
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key:
            raise EvalError(f"override {item!r} is not of the form key=value (e.g. parallel.cp=2)")
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in OVERRIDABLE):
            raise EvalError(f"override {key!r} cannot change for an eval (the model comes from the checkpoint); "
                            f"only {', '.join(k + '*' if k.endswith('.') else k for k in OVERRIDABLE)} can")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:  # omegaconf's errors name the key
        raise EvalError(f"override: {err}") from None
    from lctrain.config import ConfigError as _ConfigError
    from lctrain.config import validate_rope_scaling
    try:
        validate_rope_scaling(cfg.model)
    except _ConfigError as err:
        raise EvalError(str(err)) from None
    p = cfg.parallel
    if p.tp != 1 or p.pp != 1:
        raise EvalError(f"evals run with parallel.tp=1 and parallel.pp=1 (got tp={p.tp}, pp={p.pp}); "
                        "pass parallel.tp=1 parallel.pp=1")
    if p.cp < 1:
        raise EvalError(f"parallel.cp must be >= 1, got {p.cp}")
    pattern = "".join(str(c) for c in cfg.model.layer_pattern)
    if p.cp > 1 and "A" in pattern and cfg.model.attn_heads % p.cp:
        raise EvalError(f"model.attn_heads={cfg.model.attn_heads} does not split over parallel.cp={p.cp} "
                        "(Ulysses attention); choose cp dividing the number of attention heads")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: unknown device {cfg.train.device!r}; use auto, cpu or cuda")
    return cfg


def nproc(cfg: DictConfig) -> int:
    return int(cfg.parallel.nproc_per_node or cfg.parallel.cp)


def needs_launch(cfg: DictConfig) -> bool:
    return "WORLD_SIZE" not in os.environ and nproc(cfg) > 1


def launch_uses_cuda(cfg: DictConfig) -> bool:
    return cfg.train.device != "cpu" and torch.cuda.is_available()


@dataclass
class EvalContext:
    """The running eval's mesh coordinates and device."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    cp_group: object
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    main: bool

    def all_gather_objects(self, obj) -> list:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dev = t.device
            comm = t.cuda() if dist.get_backend() == "nccl" and dev.type != "cuda" else t
            dist.all_reduce(comm, op=dist.ReduceOp.SUM)
            t = comm.to(dev)
        return t


def start(cfg: DictConfig) -> EvalContext:
    """Initialise the mesh (a one-process world when not launched) and pick device and dtype."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from lctrain.parallel import mesh
    from lctrain.train.device import pick_device, pick_dtype

    device = pick_device(cfg.train)
    mesh.init_mesh(cfg.parallel, device)
    dtype = pick_dtype(cfg.train, device)
    return EvalContext(device=device, autocast_dtype=None if dtype == torch.float32 else dtype,
                       cp_group=mesh.cp_group(), cp_rank=mesh.cp_rank(), cp_size=mesh.cp_size(),
                       dp_rank=mesh.dp_rank(), dp_size=mesh.dp_size(), main=mesh.is_main())


def stop() -> None:
    from lctrain.parallel import mesh

    mesh.destroy_mesh()


def load_models(ckpt: str | os.PathLike, ctx: EvalContext, cfg: DictConfig):
    """-> (model, cp_model, ckpt_cfg, ckpt_path): the single-process model (decoding) and, under CP,
    the same weights built with the CP group (None without CP)."""
    from lctrain.models import build_model
    from lctrain.train.checkpoint import load_model_for_eval, resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    model, ckpt_cfg = load_model_for_eval(path, ctx.device)
    backend = cfg.model.kernel_backend
    _set_backend(model, backend)
    rope = {key: cfg.model.rope[key] for key in ROPE_EVAL_KEYS}
    if any(rope[key] != ckpt_cfg.model.rope.get(key) for key in ROPE_EVAL_KEYS):
        model.set_rope_scaling(**rope)
    ckpt_cfg = OmegaConf.merge(ckpt_cfg, {"model": {"kernel_backend": backend, "rope": rope}})
    cp_model = None
    if ctx.cp_size > 1:
        cp_model = build_model(ckpt_cfg.model, cp_group=ctx.cp_group, max_position=int(ckpt_cfg.data.seq_len))
        cp_model.load_state_dict(model.state_dict())
        cp_model = cp_model.to(ctx.device).eval()
    return model, cp_model, ckpt_cfg, path


def _set_backend(model, backend: str) -> None:
    """Apply a model.kernel_backend override to an already built model's linear mixers."""
    for module in model.modules():
        if hasattr(module, "backend") and hasattr(module, "op_name"):
            module.backend = backend


def checkpoint_label(path: Path) -> str:
    """'<run dir name>/step_<n>' for a checkpoint folder out_dir/ckpt/step_<n>."""
    path = Path(path)
    run = path.parent.parent.name if path.parent.name == "ckpt" else path.parent.name
    return f"{run}/{path.name}"


def default_out_dir(ckpt_path: Path) -> Path:
    """<run out_dir>/eval for a checkpoint out_dir/ckpt/step_<n>."""
    ckpt_path = Path(ckpt_path)
    if ckpt_path.parent.name == "ckpt":
        return ckpt_path.parent.parent / "eval"
    return ckpt_path / "eval"
