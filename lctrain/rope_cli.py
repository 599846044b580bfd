"""`lctrain rope bound --head-dim D --context T [--base B]`: the smallest RoPE base that the
"base bounds context length" criterion allows for T tokens (lctrain/models/rope.py,
``base_lower_bound``, shows the computation); with --base, also whether B passes."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "bound":
        print("lctrain rope: give the sub-command: bound", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="lctrain rope bound", description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, required=True, help="rotated dims per head (even)")
    p.add_argument("--context", type=int, required=True, help="context length in tokens")
    p.add_argument("--base", type=float, default=None, help="also check this base")
    args = p.parse_args(argv[1:])
    from lctrain.models.rope import base_lower_bound, decay_criterion_holds
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
