"""`lctrain eval niah --ckpt DIR [--lengths 1k,2k,...] [--depths 0:1:11] [--tasks ...] [RECIPE] [key=value ...]`

RULER-style needle-in-a-haystack accuracy (tasks and templates: lctrain/eval/ruler.py). For every
(task, length, depth) `--samples` prompts are built offline, the model continues each greedily on
its decoding cache (lctrain/eval/generate.py; under parallel.cp=N the prompt is prefilled sharded
over the N ranks) and the continuation is scored with RULER's string_match_all. Output in --out
(default <run>/eval): niah_<template>.json (accuracy per task x length x depth, every prediction) and
niah_<task>_<template>.png heatmaps; a table is printed.

Lengths count every token of the sequence: prompt + max_new_tokens (as RULER's max_seq_length).
With --template train (the passkey format the embedded default model is trained on) the default tiny
model can be judged; "ruler" (default) is RULER's own wording.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from .ruler import (
    TASKS,
    TEMPLATES,
    build_sample,
    get_template,
    parse_depths,
    parse_lengths,
    random_value,
    string_match_all,
)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lctrain eval niah", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: lctrain eval niah --ckpt runs/default --template train --lengths "
                                       "256,512 parallel.cp=2")
    p.add_argument("--ckpt", required=True, help="a run's out_dir, its ckpt/ folder or a ckpt/step_<n> folder")
    p.add_argument("--lengths",
                   help="comma list of lengths in tokens, k = 1024 (default: eval.niah_lengths of the run)")
    p.add_argument("--depths",
                   help="start:stop:count (linspace) or a comma list of fractions (default: eval.niah_depths)")
    p.add_argument("--tasks", help=f"comma list of {', '.join(TASKS)} (default: eval.niah_tasks)")
    p.add_argument("--samples", type=int, help="prompts per (task, length, depth) (default: eval.niah_samples)")
    p.add_argument("--template", default="ruler", choices=sorted(TEMPLATES),
                   help="ruler: RULER's wording; train: the embedded training data's passkey format; passkey: classic")
    p.add_argument("--max-new-tokens", type=int,
                   help="greedy tokens per answer (default: enough for the task's answers)")
    p.add_argument("--seed", type=int, help="sample seed (default: eval.seed)")
    p.add_argument("--out", help="output folder (default: <run out_dir>/eval)")
    p.add_argument("args", nargs="*", help="an optional recipe YAML (its parallel section), then key=value overrides")
    return p.parse_args(argv)


def default_max_new_tokens(task: str, template: str, tokenizer) -> int:
    """Room for every expected value plus separators: answers * (tokens of ' value' + 2) + 8."""
    spec = TASKS[task]
    get_template(template)  # an unknown name is refused here too
    value = random_value(random.Random(0), spec.value_type)
    answers = spec.num_values * spec.num_queries
    return answers * (len(tokenizer.encode(" " + value)) + 2) + 8


def run_niah(model, tokenizer, *, tasks, lengths, depths, samples: int, template: str = "ruler", seed: int = 0,
             max_new_tokens: int | None = None, ctx=None, cp_model=None, log=print) -> list[dict]:
    """Every sample's record (task, length, depth, index, answers, prediction, score, ...).

    With `ctx` (an EvalContext) the samples are split over the data-parallel groups and each CP group
    generates together; every rank returns the full list."""
    from .generate import generate

    dp_rank, dp_size = (ctx.dp_rank, ctx.dp_size) if ctx is not None else (0, 1)
    cp_group = ctx.cp_group if ctx is not None else None
    autocast = ctx.autocast_dtype if ctx is not None else None
    eos = getattr(tokenizer, "eos_id", None)
    records, j = [], 0
    for task in tasks:
        new_tokens = max_new_tokens or default_max_new_tokens(task, template, tokenizer)
        for length in lengths:
            start = time.perf_counter()
            for depth in depths:
                for index in range(samples):
                    mine = j % dp_size == dp_rank
                    j += 1
                    if not mine:
                        continue
                    s = build_sample(task, length, depth, tokenizer, index=index, seed=seed,
                                     max_new_tokens=new_tokens, template=template)
                    gen = generate(model, s.prompt_ids, new_tokens, eos_id=eos, cp_model=cp_model, cp_group=cp_group,
                                   autocast_dtype=autocast)
                    tokens = gen.tokens[:-1] if gen.tokens and gen.tokens[-1] == eos else gen.tokens
                    prediction = tokenizer.decode(tokens)
                    records.append({
                        "task": task, "length": length, "depth": depth, "index": index, "template": s.template,
                        "answers": s.answers, "prediction": prediction,
                        "score": string_match_all(prediction, s.answers),
                        "prompt_tokens": len(s.prompt_ids), "max_new_tokens": new_tokens,
                        "measured_depth": round(s.measured_depth, 4), "cp_prefill_tokens": gen.cp_prefill_tokens,
                    })
            if log is not None and (ctx is None or ctx.main):
                log(f"niah: {task} length {length}: {len(depths) * samples} samples in "
                    f"{time.perf_counter() - start:.1f}s"
                    + (" (this rank's share)" if dp_size > 1 else ""))
    if ctx is not None:
        mine = records if ctx.cp_rank == 0 else []
        records = [r for part in ctx.all_gather_objects(mine) for r in part]
        order = {(t, L, d, i): n for n, (t, L, d, i) in enumerate(
            (t, L, d, i) for t in tasks for L in lengths for d in depths for i in range(samples))}
        records.sort(key=lambda r: order[(r["task"], r["length"], r["depth"], r["index"])])
    return records


def summarize(records: list[dict], tasks, lengths, depths) -> dict:
    """{task: {"grid": accuracy % [depth][length], "by_length": {length: %}, "overall": %}}."""
    out = {}
    for task in tasks:
        grid, by_length = [], {}
        for d in depths:
            row = []
            for L in lengths:
                scores = [r["score"] for r in records if r["task"] == task and r["length"] == L and r["depth"] == d]
                row.append(100.0 * sum(scores) / len(scores) if scores else float("nan"))
            grid.append(row)
        for L in lengths:
            scores = [r["score"] for r in records if r["task"] == task and r["length"] == L]
            by_length[str(L)] = 100.0 * sum(scores) / len(scores) if scores else float("nan")
        scores = [r["score"] for r in records if r["task"] == task]
        out[task] = {"grid": grid, "by_length": by_length, "overall": 100.0 * sum(scores) / max(1, len(scores))}
    return out


def format_table(summary: dict, lengths, depths) -> str:
    from .plots import format_length

    lines = []
    for task, s in summary.items():
        head = f"{task:<10} {'length':>7} | " + " ".join(f"{100 * d:>5.0f}%" for d in depths) + " |   mean"
        lines += [head, "-" * len(head)]
        for j, L in enumerate(lengths):
            cells = " ".join(f"{s['grid'][i][j]:>6.1f}" for i in range(len(depths)))
            lines.append(f"{'':<10} {format_length(L):>7} | {cells} | {s['by_length'][str(L)]:>6.1f}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ns = _parse(argv)
    from lctrain.config import ConfigError, split_recipe_and_overrides
    from lctrain.local_launch import self_launch

    from . import runtime

    try:
        recipe, overrides = split_recipe_and_overrides(ns.args)
        cfg = runtime.eval_config(ns.ckpt, recipe, overrides)
        tasks = [t.strip() for t in (ns.tasks.split(",") if ns.tasks else list(cfg.eval.niah_tasks)) if t.strip()]
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise runtime.EvalError(f"--tasks: unknown task(s) {bad}; use {', '.join(TASKS)}")
        lengths = parse_lengths(ns.lengths if ns.lengths else list(cfg.eval.niah_lengths))
        depths = parse_depths(ns.depths if ns.depths else list(cfg.eval.niah_depths))
        samples = ns.samples if ns.samples is not None else int(cfg.eval.niah_samples)
        if samples < 1:
            raise runtime.EvalError(f"--samples must be >= 1, got {samples}")
        if ns.max_new_tokens is not None and ns.max_new_tokens < 1:
            raise runtime.EvalError(f"--max-new-tokens must be >= 1, got {ns.max_new_tokens}")
        tmpl = get_template(ns.template)
        for t in tasks:
            spec = TASKS[t]
            if tmpl.single_only and spec.num_keys * spec.num_values > 1:
                raise runtime.EvalError(f"--template {ns.template} holds one needle only; "
                                        f"run {t} with --template ruler")
        tokenizer = _tokenizer(cfg)
        for t in tasks:  # fail before any model work when a length cannot hold the prompt
            new_tokens = ns.max_new_tokens or default_max_new_tokens(t, ns.template, tokenizer)
            build_sample(t, min(lengths), 0.0, tokenizer, max_new_tokens=new_tokens, template=ns.template)
    except (ConfigError, ValueError) as err:
        print(f"lctrain eval niah: error: {err}", file=sys.stderr)
        return 2
    if runtime.needs_launch(cfg):
        return self_launch(["eval", "niah"], list(argv), runtime.nproc(cfg), runtime.launch_uses_cuda(cfg))

    seed = ns.seed if ns.seed is not None else int(cfg.eval.seed)
    ctx = runtime.start(cfg)
    try:
        model, cp_model, ckpt_cfg, path = runtime.load_models(ns.ckpt, ctx, cfg)
        if ctx.main:
            print(f"lctrain eval niah: {runtime.checkpoint_label(path)}, template {ns.template}, tasks "
                  f"{','.join(tasks)}, "
                  f"lengths {','.join(map(str, lengths))}, {len(depths)} depths x {samples} samples, "
                  f"cp {ctx.cp_size} x dp {ctx.dp_size} on {ctx.device.type}", flush=True)
        records = run_niah(model, tokenizer, tasks=tasks, lengths=lengths, depths=depths, samples=samples,
                           template=ns.template, seed=seed, max_new_tokens=ns.max_new_tokens, ctx=ctx,
                           cp_model=cp_model)
        if ctx.main:
            write_outputs(Path(ns.out) if ns.out else runtime.default_out_dir(path), path, records, tasks, lengths,
                          depths,
                          ns.template, seed, {"cp": ctx.cp_size, "dp": ctx.dp_size})
    finally:
        runtime.stop()
    return 0


def _tokenizer(ckpt_cfg):
    try:
        from lctrain.data import get_tokenizer
    except ImportError:
        from lctrain.data.tokenizer import get_tokenizer
    return get_tokenizer(ckpt_cfg.data)


def write_outputs(out: Path, ckpt_path: Path, records, tasks, lengths, depths, template: str, seed: int,
                  parallel: dict) -> dict:
    from . import runtime
    from .plots import niah_heatmap

    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, tasks, lengths, depths)
    report = {
        "checkpoint": str(ckpt_path), "label": runtime.checkpoint_label(ckpt_path), "template": template,
        "template_description": get_template(template).description, "seed": seed, "parallel": parallel,
        "metric": "string_match_all: share of the reference values contained in the greedy continuation "
                  "(case-insensitive), %",
        "tasks": tasks, "lengths": lengths, "depths": depths, "summary": summary, "records": records,
    }
    json_path = out / f"niah_{template}.json"
    json_path.write_text(json.dumps(report, indent=1))
    pngs = []
    for task in tasks:
        pngs.append(niah_heatmap(out / f"niah_{task}_{template}.png", lengths, depths, summary[task]["grid"],
                                 f"{task} ({template} template), {runtime.checkpoint_label(ckpt_path)}"))
    print(format_table(summary, lengths, depths))
    print(f"lctrain eval niah: wrote {json_path} and {', '.join(str(p) for p in pngs)}", flush=True)
    return report
