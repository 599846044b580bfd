"""The `lctrain` command: routes each sub-command to the module that owns it.

Every module here exposes `main(argv: list[str]) -> int` with its own argparse parser, so
`lctrain <command> --help` is answered by the module that does the work. Imports are lazy: the
CLI starts fast and a command never pays for another's dependencies.
"""
from __future__ import annotations

import importlib
import sys

# command -> module, or sub-command -> module
COMMANDS: dict[str, str | dict[str, str]] = {
    "train": "lctrain.train.launch",
    "config": {"show": "lctrain.config_cli"},
    "data": {"prepare": "lctrain.data.prepare"},
    "eval": {"niah": "lctrain.eval.niah", "position-loss": "lctrain.eval.position_loss"},
    "bench": {"kernels": "lctrain.bench.kernels", "cp": "lctrain.bench.cp", "train": "lctrain.bench.train",
              "record": "lctrain.bench.report"},
    "submit": "lctrain.submit",
}

USAGE = """usage: lctrain <command> [args]

commands:
  train [RECIPE.yaml] [key=value ...]     train a model (no arguments: the embedded CPU-sized default)
  config show [RECIPE.yaml] [key=value]   print the resolved configuration
  data prepare ...                        write MDS shards (embedded text or your own files)
  eval niah --ckpt DIR ...                needle-in-a-haystack accuracy, JSON + heatmaps
  eval position-loss --ckpt DIR ...       next-token loss at every position, CSV/JSON + plot
  bench kernels | cp | record ...         kernel / context-parallel benchmarks; record into BENCHMARKS.md
  bench train [RECIPE.yaml] [key=value]   training steps on synthetic tokens: tokens/s, MFU, peak memory
  submit RECIPE.yaml [key=value ...]      render and submit a SLURM job

`lctrain <command> [<sub-command>] --help` for details."""


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
    module = importlib.import_module(target)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
