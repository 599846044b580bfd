"""The `lctrain` command: routes each sub-command to the module that owns it.

Each target is a module exposing `main(argv: list[str]) -> int`, or `module:function` for a command
small enough to live here (`config show`); each has its own argparse parser, so `lctrain <command>
--help` is answered by the code that does the work. Imports are lazy: the CLI starts fast and a
command never pays for another's dependencies.
"""
from __future__ import annotations

import importlib
import sys

# command -> target, or sub-command -> target; a target is "module" (its main) or "module:function"
COMMANDS: dict[str, str | dict[str, str]] = {
    "train": "lctrain.train.command",
    "config": {"show": "lctrain.cli:config_show"},
    "data": {"prepare": "lctrain.data.prepare"},
    "eval": {"niah": "lctrain.eval.niah", "position-loss": "lctrain.eval.position_loss",
             "task": "lctrain.eval.task"},
    "bench": {"kernels": "lctrain.bench.kernels", "varlen": "lctrain.bench.varlen", "cp": "lctrain.bench.cp",
              "loglinear": "lctrain.bench.loglinear", "deltaformer": "lctrain.bench.deltaformer",
              "deltaformer-cp": "lctrain.bench.deltaformer_cp", "train": "lctrain.bench.train",
              "layouts": "lctrain.bench.layouts",
              "record": "lctrain.bench.report"},
    "submit": "lctrain.submit",
    "rope": {"bound": "lctrain.cli:rope_bound"},
    "repro": "lctrain.eval.repro",
}

USAGE = """usage: lctrain <command> [args]

commands:
  train [RECIPE.yaml] [key=value ...]     train a model (no arguments: the embedded CPU-sized default)
  config show [RECIPE.yaml] [key=value]   print the resolved configuration
  data prepare ...                        write MDS shards (embedded text or your own files)
  eval niah --ckpt DIR ...                needle-in-a-haystack accuracy, JSON + heatmaps
  eval position-loss --ckpt DIR ...       next-token loss at every position, CSV/JSON + plot
  eval task --ckpt DIR [--task mqar ...]  synthetic-task accuracy (MQAR, swap tracking, DAG), JSON
  repro NAME [--tiny] [--plan] [--budget-minutes M]
                                          train + evaluate the models of recipes/repro/NAME.yaml, JSON + PNG
  bench kernels | varlen | cp | loglinear | deltaformer | deltaformer-cp | record
                                          kernel / packed-document / context-parallel / log-linear /
                                          Deltaformer benchmarks; record into BENCHMARKS.md
  bench train [RECIPE.yaml] [key=value]   training steps on synthetic tokens: tokens/s, MFU, peak memory
  bench layouts RECIPE.yaml [key=value]   one recipe under several parallel layouts: tokens/s, peak memory
  submit RECIPE.yaml [key=value ...]      render and submit a SLURM job
  rope bound --head-dim D --context T     smallest RoPE base the 'base bounds context length' criterion allows

`lctrain <command> [<sub-command>] --help` for details."""


def config_show(argv: list[str]) -> int:
    """`lctrain config show [RECIPE.yaml] [key=value ...]`: print the resolved, validated configuration."""
    import argparse

    from omegaconf import OmegaConf

    from lctrain.config import ConfigError, load_config, split_recipe_and_overrides

    parser = argparse.ArgumentParser(prog="lctrain config show", description=config_show.__doc__)
    parser.add_argument("args", nargs="*", help="an optional recipe YAML, then key=value overrides")
    ns = parser.parse_args(argv)
    try:
        recipe, overrides = split_recipe_and_overrides(ns.args)
        cfg = load_config(recipe, overrides)
    except ConfigError as err:
        print(f"lctrain: configuration error: {err}", file=sys.stderr)
        return 2
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


def rope_bound(argv: list[str]) -> int:
    """`lctrain rope bound --head-dim D --context T [--base B]`: the smallest RoPE base that the 'base
    bounds context length' criterion allows for T tokens (lctrain/models/rope.py, base_lower_bound, shows
    the computation); with --base, also whether B passes."""
    import argparse

    from lctrain.models.rope import base_lower_bound, decay_criterion_holds

    p = argparse.ArgumentParser(prog="lctrain rope bound", description=rope_bound.__doc__)
    p.add_argument("--head-dim", type=int, required=True, help="rotated dims per head (even)")
    p.add_argument("--context", type=int, required=True, help="context length in tokens")
    p.add_argument("--base", type=float, default=None, help="also check this base")
    args = p.parse_args(argv)
    try:
        bound = base_lower_bound(args.head_dim, args.context)
    except ValueError as e:
        print(f"lctrain rope bound: {e}", file=sys.stderr)
        return 2
    print(f"smallest base for head dim {args.head_dim} at context {args.context}: {bound:.4g}")
    if args.base is not None:
        ok = decay_criterion_holds(args.base, args.head_dim, args.context)
        print(f"base {args.base:g}: {'passes' if ok else 'fails'} the criterion")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line (argv None: this process's own, as the `lctrain` entry point and `python -m
    lctrain.cli`; each rank of a launch is one too), or argv when called from Python."""
    if argv is not None:
        return _main(list(argv))
    code = _main(sys.argv[1:])
    _skip_the_collection_at_exit()
    return code


def _skip_the_collection_at_exit() -> None:
    """The process is about to exit: move every object to the garbage collector's permanent generation,
    so that the interpreter's shutdown collections do not walk the whole torch / megatron / streaming
    object graph (~1.5 s of each process's exit, for every rank of a launch too, measured on CPU). Only
    those collections are skipped: atexit handlers, the flushing of stdout / stderr and module teardown
    run as before, and what the commands write they close themselves. Never in a process that goes on
    (main called with argv, as the tests do): frozen objects are never collected."""
    import gc

    gc.freeze()


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    target = COMMANDS.get(command)
    if target is None:
        print(f"lctrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if isinstance(target, dict):
        if not rest or rest[0] not in target:
            choices = ", ".join(target)
            print(f"lctrain {command}: give one of: {choices}", file=sys.stderr)
            return 2
        target, rest = target[rest[0]], rest[1:]
    prog = f"lctrain {command}" + (f" {argv[1]}" if isinstance(COMMANDS[command], dict) else "")
    return run_command(prog, target, rest)


def run_command(prog: str, target: str, argv: list[str]) -> int:
    """Run one command's target: a UserError (anything the user gave wrong) becomes one line on
    stderr and exit code 2, Ctrl-C outside training one line and 130; other errors keep their
    traceback (they are bugs to report)."""
    from lctrain.errors import UserError, report_user_error
    from lctrain.process_tree import die_with_parent_if_worker

    die_with_parent_if_worker()
    try:
        module_name, _, function = target.partition(":")
        run = getattr(importlib.import_module(module_name), function or "main")
        return int(run(argv) or 0)
    except UserError as err:
        return report_user_error(prog, err)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
