"""`lctrain config show [RECIPE.yaml] [key=value ...]`: print the resolved, validated configuration."""
from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from lctrain.config import ConfigError, load_config, split_recipe_and_overrides


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lctrain config show", description=__doc__)
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
