"""`lctrain train [RECIPE.yaml] [key=value ...]`: validate the config, then run or launch the job.

When WORLD_SIZE is unset (not under torchrun / srun) and the config needs more than one process
(parallel.nproc_per_node, else cp * tp * pp), this command starts that many local processes through
torch.distributed.run, each re-running the same command; otherwise it runs the loop in this process.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from lctrain.config import ConfigError, load_config, split_recipe_and_overrides, world_size_needed
from lctrain.data.tokenizer import TokenizerError, check_model_vocab
from lctrain.local_launch import self_launch


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lctrain train",
        description="Train a model. No arguments: the embedded CPU-sized default job.",
        epilog="example: lctrain train recipes/default.yaml train.steps=50 parallel.cp=2",
    )
    parser.add_argument("args", nargs="*", help="an optional recipe YAML, then key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    ns = _parse(argv)
    try:
        recipe, overrides = split_recipe_and_overrides(ns.args)
        cfg = load_config(recipe, overrides)
        check_model_vocab(cfg)
    except (ConfigError, TokenizerError) as err:
        print(f"lctrain train: configuration error: {err}", file=sys.stderr)
        return 2

    import torch

    nproc = world_size_needed(cfg)
    if "WORLD_SIZE" not in os.environ and nproc > 1:
        use_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
        if use_cuda and nproc > torch.cuda.device_count():
            print(
                f"lctrain train: configuration error: parallel needs {nproc} processes but this node has "
                f"{torch.cuda.device_count()} GPUs; lower parallel.cp/tp/pp or run under torchrun/srun across nodes",
                file=sys.stderr,
            )
            return 2
        from lctrain.train.run_lock import HOLDER_ENV, OutDirLock

        with OutDirLock(cfg.train.out_dir):  # held for the workers, who see HOLDER_ENV
            os.environ[HOLDER_ENV] = str(os.getpid())
            try:
                return self_launch(["train"], list(argv), nproc, use_cuda)
            finally:
                del os.environ[HOLDER_ENV]

    model_parallel = cfg.parallel.cp * cfg.parallel.tp * cfg.parallel.pp
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) % model_parallel:
        print(
            f"lctrain train: configuration error: WORLD_SIZE={os.environ['WORLD_SIZE']} is not a multiple of "
            f"parallel.cp*tp*pp={model_parallel}; fix the launcher or parallel.*",
            file=sys.stderr,
        )
        return 2

    # megatron-core warns at import that it falls back to torch without Transformer Engine / Apex
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from lctrain.train.run_lock import lock_for_this_process
    from lctrain.train.trainer import train

    lock = lock_for_this_process(cfg.train.out_dir)
    try:
        summary = train(cfg)
    finally:
        if lock is not None:
            lock.release()
    return int(summary.get("exit_code", 0))
