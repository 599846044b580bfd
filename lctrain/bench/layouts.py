"""`lctrain bench layouts RECIPE`: one model trained under several parallel layouts, side by side.

For each layout (default ``tp=2 cp=2 pp=2``: each a comma-separated list of ``key=value`` of the
``parallel`` section) it runs ``lctrain train RECIPE [overrides] parallel.<layout>`` for --steps
steps in a fresh out_dir (its output goes to ``train.log`` there) and reads the run's
metrics.jsonl: tokens/s (median over the steps after
--warmup, the whole job and per GPU), the peak GPU memory per GPU (the largest over ranks,
metrics.jsonl's ``peak_mib``) and the memory held between steps per GPU (``held_mib``: weights,
optimizer state, gradient buffers: what tensor parallelism and a sharded optimizer divide). A
layout ``tp=1`` is the one-GPU run the others compare with: with it the notes give each layout's
held memory as a fraction of it. A layout the trainer refuses (e.g. one not implemented) shows as a
row with the refusal instead of figures, so the table still says what was asked. ``--json`` is rewritten
after every layout (marked ``"partial": true`` until the run ends, so a run cut by a time limit or a kill
keeps what it measured) and ``--time-limit S`` starts no new layout after S seconds (its row says not run).

Example (the mesh target: 1.3B GDN-H1 at 64K on 2 GPUs):
    lctrain bench layouts recipes/<recipe>.yaml data.seq_len=65536 --steps 10 --json layouts.json --record
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

COLUMNS = ["layout", "processes", "tokens/s", "tokens/s per GPU", "peak MiB per GPU", "held MiB per GPU", "final loss",
           "status"]


def _parse(argv):
    p = argparse.ArgumentParser(prog="lctrain bench layouts", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value config overrides applied to every layout")
    p.add_argument("--layouts", nargs="+", default=["tp=2", "cp=2", "pp=2"],
                   help="layouts, each comma-separated parallel keys, e.g. tp=2 cp=2 tp=2,cp=2; a key with a dot "
                        "is a whole config key (cp=2,data.seq_len=131072)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the tokens/s median")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="start no new layout after S seconds (the table says which were not run)")
    p.add_argument("--out-dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--record", nargs="?", const="BENCHMARKS.md", default=None, metavar="MD",
                   help="append the result to BENCHMARKS.md (or MD)")
    return p.parse_args(argv)


def _layout_overrides(layout: str) -> list[str]:
    """A layout's config overrides: ``tp=2`` means ``parallel.tp=2``; an item whose key has a dot is a
    whole config key, so a layout may also change e.g. the length (``cp=2,data.seq_len=131072``: weak
    scaling against a one-GPU layout at half the length, in the same bench)."""
    keys = [kv.strip() for kv in layout.split(",") if kv.strip()]
    for kv in keys:
        if "=" not in kv:
            raise SystemExit(f"lctrain bench layouts: layout item {kv!r} is not key=value (e.g. tp=2)")
    return [kv if "." in kv.split("=", 1)[0] else f"parallel.{kv}" for kv in keys]


def run_layout(recipe: str, overrides: list[str], layout: str, steps: int, warmup: int, out_dir: Path) -> list:
    """One table row: train under `layout`, read its metrics."""
    extra = _layout_overrides(layout)
    run_dir = out_dir / layout.replace(",", "_").replace("=", "")
    cmd = [sys.executable, "-m", "lctrain.cli", "train", recipe, *overrides, *extra, f"train.steps={steps}",
           f"train.out_dir={run_dir}", "train.resume=false", "train.ckpt_every=0", "train.ckpt_minutes=0",
           "train.save_final=false", "train.log_every=1",
           "train.progress=false", "train.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.log").write_text(proc.stdout + proc.stderr)  # the whole run's output, to read a failure
    nproc = None
    for line in proc.stdout.splitlines():
        if "world " in line and "parameters" in line:
            nproc = int(line.split("world ")[1].split()[0])
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return [layout, nproc, None, None, None, None, None, f"exit {proc.returncode}: {err[:200]}"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in records[warmup:]] or [r["tokens_per_s"] for r in records]
    tps = statistics.median(timed)
    peaks = [r["peak_mib"] for r in records if r.get("peak_mib") is not None]
    held = [r["held_mib"] for r in records if r.get("held_mib") is not None]
    gpus = nproc or 1
    return [layout, nproc, round(tps), round(tps / gpus), round(max(peaks)) if peaks else None,
            round(max(held)) if held else None, records[-1]["loss"], "ok"]


def _ratio_note(rows: list, column: str, what: str) -> list[str]:
    """Each layout's ``column`` as a fraction of the first one-process layout's (when both ran)."""
    values = {row[0]: row[COLUMNS.index(column)] for row in rows}
    base = next((row[0] for row in rows if row[1] == 1 and values[row[0]]), None)
    if base is None:
        return []
    parts = [f"{layout} {values[layout] / values[base]:.2f}" for layout in values
             if layout != base and values[layout]]
    return [f"{what} / {base} (one GPU): " + ", ".join(parts)] if parts else []


def held_ratio_notes(rows: list) -> list[str]:
    """Each layout's held memory per GPU as a fraction of the one-process layout's (when both ran)."""
    return _ratio_note(rows, "held MiB per GPU", "held memory per GPU")


def throughput_ratio_notes(rows: list) -> list[str]:
    """Each layout's tokens/s per GPU as a fraction of the one-process layout's: the scaling efficiency
    (strong at the same length; weak where the layout's length is the one-GPU length times its GPUs)."""
    return _ratio_note(rows, "tokens/s per GPU", "tokens/s per GPU")


def main(argv=None) -> int:
    from lctrain.bench.report import bench_main

    return bench_main(_parse, run, argv)


def run(args) -> dict:
    """Train each layout of ``args.layouts`` in turn and return the side-by-side result. With --json,
    the rows so far are written after every layout (marked partial), so a run cut by a time limit or a
    kill keeps what it measured in a form `lctrain bench record` accepts."""
    import torch

    from lctrain.bench.report import Clock, write_partial

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    base = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="lctrain_layouts_"))
    rows, clock = [], Clock(args.time_limit, "bench layouts")
    for layout in args.layouts:
        if clock.out_of_time():
            row = [layout] + [None] * (len(COLUMNS) - 2) + [f"not run (--time-limit {args.time_limit:g} s)"]
        else:
            row = run_layout(args.recipe, args.overrides, layout, args.steps, args.warmup, base)
        print(dict(zip(COLUMNS, row)), flush=True)
        rows.append(row)
        if len(rows) < len(args.layouts):
            write_partial(_result(args, rows, device, torch.__version__), args.json, len(rows), len(args.layouts),
                          "layouts")
    return _result(args, rows, device, torch.__version__)


def _result(args, rows: list, device: str, torch_version: str) -> dict:
    from lctrain.bench.report import result_dict, utc_date

    notes = [f"{args.steps} steps per layout, tokens/s = median after {args.warmup} warm-up steps; "
             "peak MiB = largest per-rank peak of allocated memory; held MiB = the most a rank keeps allocated "
             "after its optimizer step (weights, optimizer state, gradient buffers)"]
    notes += held_ratio_notes(rows) + throughput_ratio_notes(rows)
    return result_dict(
        f"Parallel layouts side by side: {Path(args.recipe).name} {' '.join(args.overrides)}".strip(),
        "lctrain bench layouts " + " ".join(args.argv), device, {"torch": torch_version},
        notes, COLUMNS, list(rows), date=utc_date("%Y-%m-%d"))


if __name__ == "__main__":
    raise SystemExit(main())
