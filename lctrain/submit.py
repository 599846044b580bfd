"""`lctrain submit RECIPE.yaml [key=value ...]`: render a Slurm batch script for a training run and submit it.

The configuration is validated first (the same rules as `lctrain train`), then the Slurm layout is
checked against it (nodes x processes per node must be a multiple of parallel.cp*tp*pp). The job
script comes from slurm/train.sbatch.tmpl (its header explains the job); it and the resolved
config are written to <out_dir>/slurm/, and sbatch submits the script unless --dry-run.

GPU jobs run one process per GPU (--gpus-per-node G). --gpus-per-node 0 makes a CPU job: per node
parallel.nproc_per_node processes, else cp*tp*pp, with gloo and train.device=cpu.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lctrain.config import ConfigError, load_config, split_recipe_and_overrides, validate, world_size_needed
from lctrain.errors import UserError

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "train.sbatch.tmpl"
DEFAULT_PORT = 29500
DEFAULT_SIGNAL_GRACE_S = 120
# Slurm's --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


class SubmitError(UserError, ValueError):
    """The Slurm request does not fit the configuration or the machine; the message says what to change."""


@dataclass
class JobFiles:
    script: Path
    config: Path
    log_dir: Path


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lctrain submit",
        description="Render a Slurm batch script for a training run into <out_dir>/slurm/ and submit it with sbatch.",
        epilog="example: lctrain submit recipes/hybrid_131k_cp8.yaml train.steps=2000 --nodes 2 --gpus-per-node 8 "
        "--partition gpu --time 12:00:00",
    )
    parser.add_argument("args", nargs="*", help="the recipe YAML, then key=value overrides")
    parser.add_argument("--nodes", type=int, default=1, help="nodes to allocate (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per node = training processes per node (default 8); 0 = a CPU job with gloo")
    parser.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    parser.add_argument("--time", help="time limit, HH:MM:SS or another Slurm format such as D-HH:MM:SS")
    parser.add_argument("--account", help="Slurm account to charge")
    parser.add_argument("--cpus-per-task", type=int,
                        help="CPUs per node for the job (default: unset for GPU jobs, the process count for CPU jobs)")
    parser.add_argument("--job-name", help="Slurm job name (default: lctrain-<out_dir name>)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"torchrun rendezvous port on the first node (default {DEFAULT_PORT})")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                        help="an extra sbatch option written as an #SBATCH line, e.g. --sbatch-arg=--qos=high "
                             "(repeatable)")
    parser.add_argument("--output-dir",
                        help="the run's directory (sets train.out_dir; default: train.out_dir of the config)")
    parser.add_argument("--template", default=str(TEMPLATE),
                        help="the sbatch template (default: slurm/train.sbatch.tmpl)")
    parser.add_argument("--signal-grace", type=int, default=DEFAULT_SIGNAL_GRACE_S, metavar="SECONDS",
                        help="Slurm sends SIGUSR1 this long before the time limit or a preemption (#SBATCH "
                        "--signal=B:USR1@S); the run then saves and requeues itself. 0 = no warning signal (default "
                        f"{DEFAULT_SIGNAL_GRACE_S})")
    parser.add_argument("--dry-run", action="store_true", help="write the script and config but do not call sbatch")
    return parser.parse_intermixed_args(argv)


def resolve_job_config(cfg: DictConfig, *, nodes: int, gpus_per_node: int,
                       out_dir: str | None) -> tuple[DictConfig, int]:
    """The config the job will train with, and the processes per node. Raises SubmitError / ConfigError.

    Makes train.out_dir absolute (the job may start in another directory) and, for CPU jobs, pins
    train.device=cpu and parallel.dist_backend=gloo.
    """
    cfg = cfg.copy()
    p, t = cfg.parallel, cfg.train
    if nodes < 1:
        raise SubmitError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node must be >= 0 (0 = a CPU job), got {gpus_per_node}")
    model_parallel = p.cp * p.tp * p.pp
    if gpus_per_node == 0:
        if t.device == "cuda":
            raise SubmitError("train.device=cuda but --gpus-per-node 0 asks for a CPU job; give --gpus-per-node G or "
                              "set train.device=cpu")
        if p.dist_backend == "nccl":
            raise SubmitError("parallel.dist_backend=nccl cannot run a CPU job (--gpus-per-node 0); set "
                              "parallel.dist_backend=gloo or auto")
        t.device, p.dist_backend = "cpu", "gloo"
        per_node = world_size_needed(cfg)
        per_node_what = (f"parallel.nproc_per_node={p.nproc_per_node}" if p.nproc_per_node
                         else f"parallel.cp*tp*pp={model_parallel}")
    else:
        if t.device == "cpu":
            raise SubmitError(f"train.device=cpu but --gpus-per-node {gpus_per_node} asks for GPUs; use "
                              "--gpus-per-node 0 for a CPU job")
        if p.nproc_per_node and p.nproc_per_node != gpus_per_node:
            raise SubmitError(
                f"parallel.nproc_per_node={p.nproc_per_node} disagrees with --gpus-per-node {gpus_per_node} (one "
                f"process per GPU); set parallel.nproc_per_node=0 or {gpus_per_node}"
            )
        per_node = gpus_per_node
        per_node_what = f"--gpus-per-node {gpus_per_node}"
    world = nodes * per_node
    if world % model_parallel:
        raise SubmitError(
            f"--nodes {nodes} x {per_node} processes per node ({per_node_what}) = {world} processes, not a multiple of "
            f"parallel.cp*tp*pp = {p.cp}*{p.tp}*{p.pp} = {model_parallel}; change --nodes / --gpus-per-node or "
            "parallel.cp / parallel.tp / parallel.pp"
        )
    if p.pp > 1 and world > model_parallel:
        raise SubmitError(
            f"--nodes {nodes} x {per_node} processes = {world} would be {world // model_parallel} data-parallel "
            f"replicas of parallel.cp*tp*pp = {model_parallel}; pipeline parallelism with data parallelism is not "
            f"supported yet: ask for {model_parallel} processes in all, or use parallel.pp=1"
        )
    t.out_dir = str(Path(os.path.expanduser(out_dir or t.out_dir)).resolve())
    if any(c.isspace() for c in t.out_dir):
        raise SubmitError(f"the run directory {t.out_dir!r} contains whitespace, which #SBATCH lines cannot hold; use "
                          "--output-dir without spaces")
    validate(cfg)
    return cfg, per_node


def _resource_directives(ns: argparse.Namespace, gpus_per_node: int, per_node: int) -> str:
    lines = []
    if gpus_per_node > 0:
        lines.append(f"--gpus-per-node={gpus_per_node}")
    cpus = ns.cpus_per_task if ns.cpus_per_task is not None else (per_node if gpus_per_node == 0 else None)
    if cpus is not None:
        if cpus < 1:
            raise SubmitError(f"--cpus-per-task must be >= 1, got {cpus}")
        lines.append(f"--cpus-per-task={cpus}")
    if ns.partition:
        lines.append(f"--partition={ns.partition}")
    if ns.time:
        if not _TIME.match(ns.time):
            raise SubmitError(f"--time {ns.time!r} is not a Slurm time; use HH:MM:SS (e.g. 12:00:00) or D-HH:MM:SS")
        lines.append(f"--time={ns.time}")
    if ns.account:
        lines.append(f"--account={ns.account}")
    for extra in ns.sbatch_arg:
        if not extra.startswith("-") or "\n" in extra:
            raise SubmitError(f"--sbatch-arg {extra!r} is not an sbatch option; write it like --sbatch-arg=--qos=high")
        lines.append(extra)
    for line in lines:
        if any(c.isspace() for c in line):
            raise SubmitError(f"sbatch option {line!r} contains whitespace; #SBATCH lines cannot hold it")
    return "\n".join(f"#SBATCH {line}" for line in lines)


def torchrun_command() -> str:
    """torchrun of the Python running this command (the job must use the same environment)."""
    beside = Path(sys.executable).parent / "torchrun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return shlex.quote(str(beside))
    return f"{shlex.quote(sys.executable)} -m torch.distributed.run"


def render(template_text: str, values: dict[str, str]) -> str:
    """Fill {{ name }} placeholders; drop the template's own "##" documentation lines."""
    template_text = "\n".join(line for line in template_text.splitlines() if not line.startswith("##"))
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template_text)} - values.keys())
    if missing:
        raise SubmitError(f"the template needs values for {', '.join(missing)}; it does not match this lctrain version")
    lines = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template_text).splitlines()
    # an empty directive block leaves a blank line among the #SBATCH lines; harmless, but tidy it
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])) + "\n"


def write_job(cfg: DictConfig, ns: argparse.Namespace, *, recipe: str | None, overrides: list[str],
              per_node: int) -> JobFiles:
    """Write <out_dir>/slurm/config.yaml and job.sbatch."""
    template = Path(ns.template)
    if not template.is_file():
        raise SubmitError(f"sbatch template {str(template)!r} not found; pass --template PATH (the checkout's "
                          "slurm/train.sbatch.tmpl)")
    out_dir = Path(cfg.train.out_dir)
    slurm_dir = out_dir / "slurm"
    config_path = slurm_dir / "config.yaml"
    script_path = slurm_dir / "job.sbatch"
    env = ["export DS_ACCELERATOR=cpu"] if ns.gpus_per_node == 0 else []
    from lctrain.local_launch import torchrun_signal_options

    signal_options = torchrun_signal_options(max(ns.signal_grace, 60))
    values = {
        "job_name": ns.job_name or f"lctrain-{out_dir.name}",
        "nodes": str(ns.nodes),
        "resource_directives": _resource_directives(ns, ns.gpus_per_node, per_node),
        "log_dir": str(slurm_dir),
        "template": str(template.resolve()),
        "recipe": str(Path(recipe).resolve()) if recipe else "(defaults)",
        "overrides": " ".join(overrides).replace("\n", " ") or "(none)",
        "env_exports": "\n".join(env),
        "port": str(ns.port),
        "workdir": shlex.quote(os.getcwd()),
        "nproc_per_node": str(per_node),
        "torchrun": torchrun_command(),
        "config": shlex.quote(str(config_path)),
        "signal_directive": f"#SBATCH --signal=B:USR1@{ns.signal_grace}" if ns.signal_grace else "",
        # torchrun waits this long for the workers to save after forwarding a signal, then kills them
        "torchrun_signal_options": " ".join(signal_options),
        "warning_forwarded_as": "USR1" if "--signals-to-handle" in signal_options else "TERM",
    }
    if any(c.isspace() for c in values["job_name"]):
        raise SubmitError(f"--job-name {values['job_name']!r} contains whitespace; use a name without spaces")
    if ns.signal_grace < 0:
        raise SubmitError(f"--signal-grace must be >= 0 seconds (0 = no warning signal), got {ns.signal_grace}")
    if not 1 <= ns.port <= 65535:
        raise SubmitError(f"--port must lie in 1..65535, got {ns.port}")
    text = render(template.read_text(), values)
    slurm_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(config_path, OmegaConf.to_yaml(cfg, resolve=True))
    _write_atomic(script_path, text)
    script_path.chmod(0o755)
    return JobFiles(script=script_path, config=config_path, log_dir=slurm_dir)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def submit(script: Path) -> str:
    """sbatch the script; -> the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH: run on a Slurm login node, or use --dry-run to only write the "
                          "script")
    proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused the job (exit {proc.returncode}): "
                          f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().splitlines()[-1].split(";")[0]


def main(argv: list[str]) -> int:
    ns = _parse(argv)
    try:
        recipe, overrides = split_recipe_and_overrides(ns.args)
        cfg = load_config(recipe, overrides)
        cfg, per_node = resolve_job_config(cfg, nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, out_dir=ns.output_dir)
    except (ConfigError, SubmitError) as err:
        print(f"lctrain submit: configuration error: {err}", file=sys.stderr)
        return 2
    try:
        if not ns.dry_run and shutil.which("sbatch") is None:
            raise SubmitError("sbatch not found on PATH: run on a Slurm login node, or use --dry-run to only write the "
                              "script")
        files = write_job(cfg, ns, recipe=recipe, overrides=overrides, per_node=per_node)
    except SubmitError as err:
        print(f"lctrain submit: error: {err}", file=sys.stderr)
        return 2
    if not cfg.train.resume:
        print("lctrain submit: warning: train.resume=false, so a requeued job starts again from step 0",
              file=sys.stderr)
    world = ns.nodes * per_node
    print(f"lctrain submit: {ns.nodes} node(s) x {per_node} process(es) = {world} "
          f"({'CPU, gloo' if ns.gpus_per_node == 0 else 'GPU'}); run directory {cfg.train.out_dir}")
    print(f"  script: {files.script}\n  config: {files.config}")
    if ns.dry_run:
        print(f"dry run: not submitted; submit with `sbatch {files.script}`")
        return 0
    try:
        job_id = submit(files.script)
    except SubmitError as err:
        print(f"lctrain submit: error: {err}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}; log: {files.log_dir / (job_id + '.out')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
