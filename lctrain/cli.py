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
    "eval": {"niah": "lctrain.eval.niah", "position-loss": "lctrain.eval.position_loss"},
    "bench": {"kernels": "lctrain.bench.kernels", "varlen": "lctrain.bench.varlen", "cp": "lctrain.bench.cp",
              "layouts": "lctrain.bench.layouts", "record": "lctrain.bench.report"},
    "submit": "lctrain.submit",
}

USAGE = """usage: lctrain <command> [args]

commands:
  train [RECIPE.yaml] [key=value ...]     train a model (no arguments: the embedded CPU-sized default)
  config show [RECIPE.yaml] [key=value]   print the resolved configuration
  data prepare ...                        write MDS shards (embedded text or your own files)
  eval niah --ckpt DIR ...                needle-in-a-haystack accuracy, JSON + heatmaps
  eval position-loss --ckpt DIR ...       next-token loss at every position, CSV/JSON + plot
  bench kernels | varlen | cp | layouts | record
                                          kernel / packed-document / context-parallel / parallel-layout
                                          benchmarks; record into BENCHMARKS.md
  submit RECIPE.yaml [key=value ...]      render and submit a SLURM job

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
