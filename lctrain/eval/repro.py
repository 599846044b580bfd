"""`lctrain repro NAME`: reproduce a synthetic result: train the models a recipes/repro/NAME.yaml lists,
one after another on this machine, evaluate each, and write JSON + a PNG comparing them + a short
Markdown report (command, device, wall time, and whether the claim held).

A repro recipe (see recipes/repro/) holds:
- `claim`: `text` (the claim in words) and `checks` (how the results decide it; see `check_claim`);
- `base`: `key: value` training overrides shared by every run (dotted keys, as on `lctrain train`);
- `models`: name -> overrides of that model (e.g. `model.layer_pattern: DD`);
- `sweep` (optional): `key` and `values`: one training run per value and model (the x axis); `with`
  (optional): `{other.key: [one value per sweep value]}`, keys that move together with it (e.g. the
  sequence length growing with the number of pairs);
- `eval`: `kind: task` (`lctrain eval task` on the run's own task; `samples`), `kind: niah`
  (`lctrain eval niah`; `tasks`, `lengths`, `depths`, `samples`: the x axis is then the length) or
  `kind: position_loss` (`lctrain eval position-loss` over every model's checkpoint after all trained;
  `data`, `seq_len`, `num_windows`, `batch_size`: the x axis is the token position, the value a loss,
  lower is better);
- `tiny`: `base` overrides, and optionally `sweep` (`values` / `with` replacing the sweep's) and `eval`
  replacements, for `--tiny`, a CPU-sized smoke run (2 steps) that checks the plumbing, not the claim.

Runs go sweep point by sweep point (every model at the first value, then the next), so that when
`--budget-minutes` stops the repro early the points that ran compare every model.

Training and evals run in this process through the commands' own `main`, so a run is exactly what
`lctrain train` / `lctrain eval ...` would do with the printed arguments. With `--jobs N` (N > 1) up to N
runs train at once, each as its own `lctrain train` process on the same device (the repros' small models
leave most of a GPU idle: one repro alone kept an H200 busy ~21% of the time, three side by side ~34%);
the evals then follow one at a time, in the plan's order.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import textwrap
import time
from pathlib import Path

import yaml

from lctrain.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes" / "repro"
EVAL_KINDS = ("task", "niah", "position_loss")
CHECK_KEYS = {"model", "order", "series", "at", "min", "max", "from", "improves_after"}


class ReproError(UserError, ValueError):
    """A repro recipe or argument is wrong; the message names the key."""


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lctrain repro", description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="recipes/repro/NAME.yaml (or a path to a repro YAML)")
    p.add_argument("--tiny", action="store_true", help="the recipe's CPU-sized smoke settings (2 steps): plumbing only")
    p.add_argument("--runs", help="where the training runs go (default runs/repro/NAME)")
    p.add_argument("--out",
                   help="where NAME.json / .png / .md go (default docs/results/repro; with --tiny: <runs>/results)")
    p.add_argument("--models", help="comma list: only these models of the recipe")
    p.add_argument("--points", help="comma list: only these values of the recipe's sweep")
    p.add_argument("--budget-minutes", type=float,
                   help="start no further training run once the time spent plus that run's expected time (the "
                        "model's last run, else the mean finished run) would pass this many minutes; the runs "
                        "left out are listed and the claim is then not decided (default: no limit)")
    p.add_argument("--jobs", type=int, default=1,
                   help="train up to this many runs at once, each in its own `lctrain train` process on this "
                        "device; the evals follow one at a time (default 1: one run after another, in this "
                        "process)")
    p.add_argument("--plan", action="store_true",
                   help="print the training runs (validated) and their total steps, then stop: nothing trains")
    p.add_argument("overrides", nargs="*", help="key=value training overrides for every run (after the recipe's)")
    return p.parse_intermixed_args(argv)


def recipe_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return RECIPE_DIR / f"{name}.yaml"


def load_repro(name: str) -> dict:
    """The repro recipe as a dict, its required keys checked."""
    path = recipe_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
        raise ReproError(f"no repro recipe {str(path)!r}; use one of {known}")
    rec = yaml.safe_load(path.read_text()) or {}
    for key in ("claim", "models", "eval"):
        if key not in rec:
            raise ReproError(f"{path}: `{key}` is missing (see lctrain/eval/repro.py)")
    if rec["eval"].get("kind") not in EVAL_KINDS:
        raise ReproError(f"{path}: eval.kind must be one of {EVAL_KINDS}, got {rec['eval'].get('kind')!r}")
    if rec["eval"]["kind"] == "niah" and rec.get("sweep"):
        raise ReproError(f"{path}: a niah repro sweeps lengths in eval.lengths; drop `sweep`")
    unknown = set(rec) - {"claim", "base", "models", "sweep", "eval", "tiny"}
    if unknown:
        raise ReproError(f"{path}: unknown key(s) {sorted(unknown)}")
    for tiny in (False, True):
        _sweep(rec, tiny, str(path))  # a `with` list of the wrong length is refused here
    for i, c in enumerate(rec["claim"].get("checks", [])):
        bad = set(c) - CHECK_KEYS
        if bad or ("model" in c) == ("order" in c):
            raise ReproError(f"{path}: claim.checks[{i}]: give `model` or `order` (not both) and only keys "
                             f"{sorted(CHECK_KEYS)}; got {sorted(c)}")
    rec["path"] = str(path)
    return rec


def _sweep(rec: dict, tiny: bool, where: str = "") -> dict:
    """The sweep ({} when none): key, values and `with` ({key: values}), the tiny replacements applied."""
    sweep = dict(rec.get("sweep") or {})
    if not sweep:
        return {}
    if tiny:
        sweep.update((rec.get("tiny") or {}).get("sweep") or {})
    sweep.setdefault("with", {})
    for key, vals in sweep["with"].items():
        if len(vals) != len(sweep["values"]):
            raise ReproError(f"{where or rec.get('path')}: {'tiny.' if tiny else ''}sweep.with.{key} holds "
                             f"{len(vals)} values, sweep.values {len(sweep['values'])}; give one per sweep value")
    return sweep


def _dotlist(mapping: dict | None) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else v}"
            for k, v in (mapping or {}).items()]


def plan(rec: dict, *, tiny: bool, runs: Path, overrides: list[str], only: list[str] | None,
         points: list[str] | None = None) -> list[dict]:
    """One entry per training run, sweep point by sweep point: model, x (the sweep value or None),
    out_dir and the train argv."""
    models = rec["models"]
    if only:
        bad = [m for m in only if m not in models]
        if bad:
            raise ReproError(f"--models: {bad} not in the recipe's models {list(models)}")
        models = {m: models[m] for m in only}
    sweep = _sweep(rec, tiny)
    if points is not None and not sweep:
        raise ReproError(f"--points: the recipe {rec['path']} has no sweep; drop --points")
    sweep_points = []  # (x, {key: value}) per sweep value
    for i, v in enumerate(sweep.get("values", [])):
        if points is None or str(v) in points:
            sweep_points.append((v, {sweep["key"]: v, **{k: vals[i] for k, vals in sweep["with"].items()}}))
    if points is not None:
        bad = [p for p in points if p not in {str(v) for v in sweep["values"]}]
        if bad:
            raise ReproError(f"--points: {bad} not among the sweep's values {sweep['values']}")
    base = _dotlist(rec.get("base")) + (_dotlist((rec.get("tiny") or {}).get("base")) if tiny else [])
    runs_plan = []
    for x, point in sweep_points or [(None, {})]:
        for model, model_over in models.items():
            out = runs / (model if x is None else f"{model}_{x}")
            argv = [*base, *_dotlist(model_over), *_dotlist(point), *overrides, f"train.out_dir={out}"]
            runs_plan.append({"model": model, "x": x, "out_dir": str(out), "train_argv": argv})
    return runs_plan


def eval_settings(rec: dict, tiny: bool) -> dict:
    return dict(rec["eval"], **((rec.get("tiny") or {}).get("eval") or {})) if tiny else dict(rec["eval"])


def eval_argv(rec: dict, tiny: bool, out_dir: str) -> tuple[list[str], dict]:
    """The per-run eval's argv (task, niah) and the eval settings."""
    ev = eval_settings(rec, tiny)
    argv = ["--ckpt", out_dir, "--out", str(Path(out_dir) / "eval")]
    if ev["kind"] == "task":
        argv += ["--samples", str(ev.get("samples", 256))]
    else:
        argv += ["--tasks", ",".join(ev["tasks"]), "--lengths", ",".join(map(str, ev["lengths"])),
                 "--depths", ",".join(map(str, ev.get("depths", [0.0, 0.25, 0.5, 0.75, 1.0]))),
                 "--samples", str(ev.get("samples", 10))]
    return argv, ev


def position_loss_argv(ev: dict, trained: list[dict], out: Path) -> list[str]:
    """`lctrain eval position-loss` over every trained model, labelled by model name."""
    argv = []
    for r in trained:
        argv += ["--ckpt", r["out_dir"], "--label", r["model"]]
    argv += ["--data", str(ev.get("data", "embedded")), "--num-windows", str(ev.get("num_windows", 16)),
             "--batch-size", str(ev.get("batch_size", 1)), "--out", str(out)]
    if ev.get("seq_len"):
        argv += ["--seq-len", str(ev["seq_len"])]
    return argv


def check_niah_eval(rec: dict, tiny: bool, cfg) -> None:
    """A niah eval's shortest length must hold each task's prompt (else it would fail after training)."""
    ev = eval_settings(rec, tiny)
    if ev["kind"] != "niah":
        return
    from lctrain.data.tokenizer import get_tokenizer

    from .niah import default_max_new_tokens
    from .ruler import build_sample

    tok = get_tokenizer(cfg.data)
    for t in ev["tasks"]:
        try:
            build_sample(t, min(ev["lengths"]), 0.0, tok, max_new_tokens=default_max_new_tokens(t, "ruler", tok))
        except ValueError as err:
            raise ReproError(f"{rec['path']}: eval{' (tiny)' if tiny else ''}: {err}") from None


def read_eval(ev: dict, out_dir: str) -> dict:
    """{series: {x: accuracy 0..1}} of one run's eval output."""
    eval_dir = Path(out_dir) / "eval"
    if ev["kind"] == "task":
        (path,) = eval_dir.glob("task_*.json")
        r = json.loads(path.read_text())
        return {r["task"]: r["accuracy"]}
    r = json.loads((eval_dir / "niah_ruler.json").read_text())
    return {t: {int(L): a / 100.0 for L, a in r["summary"][t]["by_length"].items()} for t in r["tasks"]}


def read_position_loss(out: Path) -> dict:
    """{model: {"loss": {position: smoothed loss}}} of a position-loss eval labelled by model."""
    r = json.loads((out / "position_loss.json").read_text())
    return {c["label"]: {"loss": {f"{p:.1f}": loss
                                  for p, loss in zip(c["smoothed"]["position"], c["smoothed"]["loss"])}}
            for c in r["checkpoints"]}


def _series_values(results: dict, model: str, series: str | None) -> list[tuple]:
    per = results[model]
    if series is None:
        if len(per) != 1:
            raise ReproError(f"a check on {model} must name its `series` (one of {list(per)})")
        series = next(iter(per))
    if series not in per:
        raise ReproError(f"a check names series {series!r}; the results hold {list(per)}")
    return sorted(per[series].items(), key=lambda kv: float(kv[0]))


def _pick(values: list[tuple], at: str) -> list[float]:
    accs = [a for _, a in values]
    if at == "all":
        return accs
    if at == "last":
        return accs[-1:]
    if at == "mean":
        return [sum(accs) / len(accs)]
    raise ReproError(f"check `at` must be all, last or mean, got {at!r}")


def check_claim(checks: list[dict], results: dict, *, lower_is_better: bool = False) -> tuple[bool, list[str]]:
    """Each check is one of
    - `{model, series?, at: all|last|mean, min: a}` / `{..., max: a}`: the model's value there is
      >= a / <= a (accuracies are 0..1);
    - `{order: [m1, m2, ...], series?, at: mean|last}`: m1 is at least as good as m2, ... and strictly
      better than the last (all equal, e.g. all 0%, shows no ordering and does not hold); good is a
      higher accuracy, or a lower loss with `lower_is_better` (position_loss);
    - `{model, series?, improves_after: x}`: the value at the last x is strictly better than at the
      first x >= the given one (e.g. the loss still falls after position 512).
    `from: x` (any check): only the x values >= x count.
    A check naming a model that was not run (`--models`, `--budget-minutes`) does not hold.
    Returns (all held, one line per check)."""
    def better_eq(a, b):
        return a <= b if lower_is_better else a >= b

    def fmt(a):
        return f"{a:.4f}" if lower_is_better else f"{100 * a:.0f}%"

    lines, held = [], True
    for c in checks:
        at = c.get("at", "all")
        missing = [m for m in (c["order"] if "order" in c else [c["model"]]) if m not in results]
        if missing:
            lines.append(f"not run: {', '.join(missing)} (a check needs them)")
            held = False
            continue

        def values(model, c=c):
            return [(x, v) for x, v in _series_values(results, model, c.get("series"))
                    if float(x) >= float(c.get("from", float("-inf")))]

        where = " ".join(str(s) for s in (c.get("series", ""), f"x >= {c['from']}" if "from" in c else "") if s)
        empty = [m for m in (c["order"] if "order" in c else [c["model"]]) if not values(m)]
        if empty or ("improves_after" in c and not any(float(x) >= float(c["improves_after"])
                                                      for x, _ in values(c["model"]))):
            lines.append(f"FAILED: {where}: no value at x >= {c.get('improves_after', c.get('from'))} "
                         f"for {', '.join(empty or [c['model']])}")
            held = False
            continue
        if "order" in c:
            accs = [_pick(values(m), at)[0] for m in c["order"]]
            ok = all(better_eq(a, b) for a, b in zip(accs, accs[1:])) and accs[0] != accs[-1]
            what = (" <= " if lower_is_better else " >= ").join(f"{m} {fmt(a)}" for m, a in zip(c["order"], accs))
            lines.append(f"{'held' if ok else 'FAILED'}: {where} {at}: {what}".replace("  ", " "))
        elif "improves_after" in c:
            vals = values(c["model"])
            start = next((x, v) for x, v in vals if float(x) >= float(c["improves_after"]))
            ok = start[1] != vals[-1][1] and better_eq(vals[-1][1], start[1])
            lines.append(f"{'held' if ok else 'FAILED'}: {c['model']} {where} improves after x={float(start[0]):g}: "
                         f"{fmt(start[1])} there, {fmt(vals[-1][1])} at x={float(vals[-1][0]):g}".replace("  ", " "))
        else:
            accs = _pick(values(c["model"]), at)
            ok = all(a >= c["min"] for a in accs) if "min" in c else all(a <= c["max"] for a in accs)
            bound = f">= {fmt(c['min'])}" if "min" in c else f"<= {fmt(c['max'])}"
            lines.append(f"{'held' if ok else 'FAILED'}: {c['model']} {where} {at} {bound}: ".replace("  ", " ")
                         + ", ".join(fmt(a) for a in accs))
        held &= ok
    return held, lines


def plot(path: Path, results: dict, xlabel: str, title: str, ylabel: str = "accuracy (%)") -> Path:
    """One panel per series: the value vs x (log x), one line per model; accuracies in percent."""
    from .plots import plt

    scale = 100.0 if ylabel.startswith("accuracy") else 1.0
    series = sorted({s for per in results.values() for s in per})
    n = max(len(series), 1)
    fig, axes = plt.subplots(1, n, figsize=(max(4.0 * n, 7.0), 3.6), squeeze=False)
    for ax, s in zip(axes[0], series):
        for model, per in results.items():
            if s in per:
                xs = sorted(per[s], key=float)
                ax.plot([float(x) for x in xs], [scale * per[s][x] for x in xs],
                        marker="o" if len(xs) < 20 else None, label=model)
        ax.set_xscale("log", base=2)
        if scale == 100.0:
            ax.set_ylim(-3, 103)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(s, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (1 GPU)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _x_label(rec: dict, tiny: bool) -> str:
    ev = eval_settings(rec, tiny)
    if ev["kind"] == "niah":
        return "eval length (tokens)"
    if ev["kind"] == "position_loss":
        return "token position"
    sweep = _sweep(rec, tiny)
    return sweep["key"] + "".join(f" (with {k} {v[0]}..{v[-1]})" for k, v in sweep["with"].items())


def write_report(out: Path, rec: dict, argv: list[str], *, tiny: bool, budget: float | None, results: dict,
                 done: list[dict], skipped: list[dict], pending: list[dict], wall: float) -> tuple[str, list[str]]:
    """NAME.json / .png / .md in `out`; with runs `pending` (written after each run) the verdict says the
    repro has not finished. Returns (verdict, one line per check)."""
    name = Path(rec["path"]).stem
    lower = eval_settings(rec, tiny)["kind"] == "position_loss"
    held, lines = check_claim(rec["claim"].get("checks", []), results, lower_is_better=lower)

    def where(runs):
        return ", ".join(run_label(r) for r in runs)

    # A model whose updates were skipped trained on fewer steps than its rivals (or hardly at all): its
    # scores compare nothing, so the claim is not decided (sniah_ordering 2026-12-01: 492 and 562 of 600 skipped)
    unsound = [r for r in done if r.get("skipped_updates")]
    if unsound:
        lines.append("updates skipped on non-finite gradients: " + ", ".join(
            f"{where([r])} {r['skipped_updates']} of {r['steps']}" for r in unsound))
    if skipped:
        lines.append(f"not run (--budget-minutes {budget:g}): {where(skipped)}")
    if pending:
        lines.append(f"not run yet: {where(pending)}")
    command = "lctrain repro " + shlex.join(argv)
    verdict = ("The claim is NOT decided: the repro has not finished (written after each run)" if pending else
               "The claim was NOT decided: runs skipped updates on non-finite gradients" if unsound else
               "The claim held" if held else
               "The claim was NOT decided: runs were left out by the budget" if skipped else
               "The claim did NOT hold") + (" (--tiny: 2-step smoke run, says nothing about the claim)"
                                            if tiny else "")
    report = {"name": name, "claim": rec["claim"]["text"], "held": held and not (pending or unsound),
              "decided": not (skipped or pending or unsound), "finished": not pending, "checks": lines,
              "command": command,
              "device": device_name(), "wall_s": round(wall, 1), "tiny": tiny,
              "metric": "loss (lower is better)" if lower else "accuracy", "results": results, "runs": done,
              "skipped": [r["out_dir"] for r in skipped], "pending": [r["out_dir"] for r in pending],
              "recipe": rec["path"], "x": _x_label(rec, tiny)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    png = plot(out / f"{name}.png", results, report["x"], f"{name}: {rec['claim']['text']}",
               ylabel="next-token loss (nats)" if lower else "accuracy (%)")
    md = [f"# {name}", "", f"Claim: {rec['claim']['text']}", "", f"**{verdict}.**", "",
          *[f"- {line}" for line in lines], "", f"- command: `{command}`", f"- device: {report['device']}",
          f"- wall time: {wall / 60:.1f} min ({len(done)} training runs"
          + (f", {len(skipped)} left out" if skipped else "") + ")", "",
          "| model | x | steps | skipped updates | wall (s, train + eval) |", "|---|---|---|---|---|",
          *[f"| {r['model']} | {'' if r['x'] is None else r['x']} | {r['steps']} | {r.get('skipped_updates', 0)} "
            f"| {r['wall_s']} |" for r in done], "",
          f"![{name}]({png.name})", "", f"Data: [{name}.json]({name}.json)", ""]
    (out / f"{name}.md").write_text("\n".join(md))
    return verdict, lines


def run_label(r: dict) -> str:
    """A run as the reports and messages name it: its model, and its sweep value if any ("deltanet at 64")."""
    return r["model"] + (f" at {r['x']}" if r["x"] is not None else "")


def past_budget(started: float, budget_minutes: float | None, finished: list[dict], model: str,
                key: str = "wall_s") -> bool:
    """Whether a run of `model` started now would end past --budget-minutes: the time spent plus its
    expected time (`expected_wall` over the finished runs' `key`). Never before a run has finished."""
    return budget_minutes is not None and bool(finished) and \
        time.time() - started + expected_wall(finished, model, key) > 60 * budget_minutes


def skipped_updates(out_dir: Path) -> int:
    """How many of a run's optimizer steps were skipped on a non-finite loss or gradient (the trainer's
    bad_steps count in metrics.jsonl; 0 without one)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    most = 0
    for line in path.read_text().splitlines():
        try:
            most = max(most, int(json.loads(line).get("bad_steps", 0) or 0))
        except (ValueError, AttributeError):
            continue
    return most


def train_side_by_side(runs_plan: list[dict], jobs: int, budget_minutes: float | None, started: float,
                       log_dir: Path) -> tuple[list[dict], list[dict]]:
    """Train the runs `jobs` at a time, each as a `lctrain train` process whose output goes to
    log_dir/<run>.train.log; -> (trained, left out by the budget), both in plan order. A run is not
    started once the time spent plus its expected training time (`expected_wall` over the finished
    runs' `train_s`) would pass the budget; until one has finished, the first `jobs` start. A failed run
    stops the others and raises with the end of its log. Each process is killed with this one
    (PR_SET_PDEATHSIG), so a `timeout` around the repro leaves none training."""
    import subprocess

    from lctrain.process_tree import die_with_parent

    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, finished, skipped = list(runs_plan), {}, [], []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                r = pending.pop(0)
                if past_budget(started, budget_minutes, finished, r["model"], key="train_s"):
                    skipped.append(r)
                    continue
                log = log_dir / f"{Path(r['out_dir']).name}.train.log"
                print(f"lctrain repro: start {run_label(r)} (log {log}): lctrain train {shlex.join(r['train_argv'])}",
                      flush=True)
                with open(log, "w") as fh:
                    proc = subprocess.Popen([sys.executable, "-m", "lctrain.cli", "train", *r["train_argv"]],
                                            stdout=fh, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
                running[proc] = (r, time.time(), log)
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                r, t0, log = running.pop(proc)
                r["train_s"] = round(time.time() - t0, 1)
                if proc.returncode != 0:
                    raise ReproError(f"training {r['out_dir']} failed (exit {proc.returncode}); the end of {log}:\n"
                                     + "\n".join(log.read_text().splitlines()[-25:]))
                print(f"lctrain repro: {run_label(r)} trained in {r['train_s']} s", flush=True)
                finished.append(r)
    finally:
        for proc in running:
            proc.kill()
            proc.wait()
    order = {id(r): i for i, r in enumerate(runs_plan)}
    return sorted(finished, key=lambda r: order[id(r)]), sorted(skipped, key=lambda r: order[id(r)])


def expected_wall(done: list[dict], model: str, key: str = "wall_s") -> float:
    """Seconds the next run of `model` should take (`key`: wall_s, or train_s for training alone): its own
    last run's, else the mean finished run's."""
    own = [d[key] for d in done if d["model"] == model]
    return own[-1] if own else sum(d[key] for d in done) / len(done)


def main(argv: list[str]) -> int:
    ns = _parse(argv)
    rec = load_repro(ns.name)
    name = Path(rec["path"]).stem
    runs = Path(ns.runs or f"runs/repro/{name}{'_tiny' if ns.tiny else ''}")
    out = Path(ns.out or (runs / "results" if ns.tiny else "docs/results/repro"))
    only = [m.strip() for m in ns.models.split(",")] if ns.models else None
    points = [p.strip() for p in ns.points.split(",")] if ns.points else None
    if ns.budget_minutes is not None and ns.budget_minutes <= 0:
        raise ReproError(f"--budget-minutes must be > 0, got {ns.budget_minutes}")
    if ns.jobs < 1:
        raise ReproError(f"--jobs must be >= 1, got {ns.jobs}")
    runs_plan = plan(rec, tiny=ns.tiny, runs=runs, overrides=list(ns.overrides), only=only, points=points)

    from lctrain.config import load_config

    for r in runs_plan:  # every run's config (and a niah eval's prompt) is valid before the first one trains
        cfg = load_config(None, r["train_argv"])
        r["steps"] = int(cfg.train.steps)
        check_niah_eval(rec, ns.tiny, cfg)
    if ns.plan:
        for r in runs_plan:
            print(f"{r['model']} x={r['x']} steps={r['steps']}: lctrain train {shlex.join(r['train_argv'])}")
        print(f"lctrain repro {name}: {len(runs_plan)} runs, {sum(r['steps'] for r in runs_plan)} steps in all "
              f"(eval: {eval_settings(rec, ns.tiny)['kind']})", flush=True)
        return 0
    from lctrain.train.command import main as train_main

    from . import niah, position_loss, task

    ev_cfg = eval_settings(rec, ns.tiny)
    kind = ev_cfg["kind"]
    evaluate = {"task": task.main, "niah": niah.main}.get(kind)
    started = time.time()
    results: dict = {}
    done, skipped = [], []
    trained = None
    if ns.jobs > 1:
        trained, skipped = train_side_by_side(runs_plan, ns.jobs, ns.budget_minutes, started, runs / "logs")
    queue = runs_plan if trained is None else trained  # what is evaluated, in order
    for i, r in enumerate(queue):
        if trained is None and past_budget(started, ns.budget_minutes, done, r["model"]):
            skipped.append(r)
            continue
        t0 = time.time()
        if trained is None:
            sweep = f" {rec['sweep']['key']}={r['x']}" if r["x"] is not None else ""
            print(f"lctrain repro {name}: {r['model']}{sweep}: lctrain train {shlex.join(r['train_argv'])}", flush=True)
            if train_main(r["train_argv"]) != 0:
                raise ReproError(f"training {r['out_dir']} failed (see above)")
        r["skipped_updates"] = skipped_updates(Path(r["out_dir"]))
        if evaluate is not None:
            ev_argv, ev = eval_argv(rec, ns.tiny, r["out_dir"])
            if evaluate(ev_argv) != 0:
                raise ReproError(f"evaluating {r['out_dir']} failed (see above)")
            got = read_eval(ev, r["out_dir"])
            per = results.setdefault(r["model"], {})
            for series, value in got.items():
                per.setdefault(series, {}).update({str(r["x"]): value} if r["x"] is not None
                                                  else {str(k): v for k, v in value.items()})
        r["wall_s"] = round(time.time() - t0 + r.get("train_s", 0.0), 1)  # side by side: its training + its eval
        done.append(r)
        if kind != "position_loss":  # so that a repro stopped from outside still leaves what it measured
            write_report(out, rec, argv, tiny=ns.tiny, budget=ns.budget_minutes, results=results, done=done,
                         skipped=skipped, pending=queue[i + 1:], wall=time.time() - started)
    if kind == "position_loss" and done:
        pl_out = runs / "position_loss"
        pl_argv = position_loss_argv(ev_cfg, done, pl_out)
        print(f"lctrain repro {name}: lctrain eval position-loss {shlex.join(pl_argv)}", flush=True)
        if position_loss.main(pl_argv) != 0:
            raise ReproError("the position-loss eval failed (see above)")
        results = read_position_loss(pl_out)
    verdict, lines = write_report(out, rec, argv, tiny=ns.tiny, budget=ns.budget_minutes, results=results,
                                  done=done, skipped=skipped, pending=[], wall=time.time() - started)
    print(f"lctrain repro {name}: {verdict}; wrote {out / name}.json, .png, .md", flush=True)
    for line in lines:
        print(f"  {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
