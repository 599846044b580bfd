"""`lctrain repro NAME`: reproduce a synthetic result: train the models a recipes/repro/NAME.yaml lists,
one after another on this machine, evaluate each, and write JSON + a PNG comparing them + a short
Markdown report (command, device, wall time, and whether the claim held).

A repro recipe (see recipes/repro/) holds:
- `claim`: `text` (the claim in words) and `checks` (how the results decide it; see `check_claim`);
- `base`: `key: value` training overrides shared by every run (dotted keys, as on `lctrain train`);
- `models`: name -> overrides of that model (e.g. `model.layer_pattern: DD`);
- `sweep` (optional): `key` and `values`: one training run per value and model (the x axis);
- `eval`: `kind: task` (`lctrain eval task` on the run's own task; `samples`) or `kind: niah`
  (`lctrain eval niah`; `tasks`, `lengths`, `depths`, `samples`): the x axis is then the length;
- `tiny`: `base` overrides, and optionally `sweep_values` / `eval` replacements, for `--tiny`, a
  CPU-sized smoke run (2 steps) that checks the plumbing, not the claim.

Training and evals run in this process through the commands' own `main`, so a run is exactly what
`lctrain train` / `lctrain eval ...` would do with the printed arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import yaml

from lctrain.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes" / "repro"
EVAL_KINDS = ("task", "niah")


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
    rec["path"] = str(path)
    return rec


def _dotlist(mapping: dict | None) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else v}"
            for k, v in (mapping or {}).items()]


def plan(rec: dict, *, tiny: bool, runs: Path, overrides: list[str], only: list[str] | None) -> list[dict]:
    """One entry per training run: model, x (the sweep value or None), out_dir and the train argv."""
    models = rec["models"]
    if only:
        bad = [m for m in only if m not in models]
        if bad:
            raise ReproError(f"--models: {bad} not in the recipe's models {list(models)}")
        models = {m: models[m] for m in only}
    sweep = rec.get("sweep") or {}
    tiny_cfg = rec.get("tiny") or {}
    values = (tiny_cfg.get("sweep_values") or sweep.get("values")) if tiny else sweep.get("values")
    points = [(sweep["key"], v) for v in values] if sweep else [(None, None)]
    base = _dotlist(rec.get("base")) + (_dotlist(tiny_cfg.get("base")) if tiny else [])
    runs_plan = []
    for model, model_over in models.items():
        for key, value in points:
            out = runs / (model if key is None else f"{model}_{value}")
            argv = [*base, *_dotlist(model_over), *([f"{key}={value}"] if key else []), *overrides,
                    f"train.out_dir={out}"]
            runs_plan.append({"model": model, "x": value, "out_dir": str(out), "train_argv": argv})
    return runs_plan


def eval_argv(rec: dict, tiny: bool, out_dir: str) -> tuple[list[str], dict]:
    ev = dict(rec["eval"], **((rec.get("tiny") or {}).get("eval") or {})) if tiny else dict(rec["eval"])
    argv = ["--ckpt", out_dir, "--out", str(Path(out_dir) / "eval")]
    if ev["kind"] == "task":
        argv += ["--samples", str(ev.get("samples", 256))]
    else:
        argv += ["--tasks", ",".join(ev["tasks"]), "--lengths", ",".join(map(str, ev["lengths"])),
                 "--depths", ",".join(map(str, ev.get("depths", [0.0, 0.25, 0.5, 0.75, 1.0]))),
                 "--samples", str(ev.get("samples", 10))]
    return argv, ev


def check_niah_eval(rec: dict, tiny: bool, cfg) -> None:
    """A niah eval's shortest length must hold each task's prompt (else it would fail after training)."""
    _, ev = eval_argv(rec, tiny, "")
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


def check_claim(checks: list[dict], results: dict) -> tuple[bool, list[str]]:
    """Each check is one of
    - `{model, series?, at: all|last|mean, min: a}` / `{..., max: a}`: the model's accuracy (0..1) there
      is >= a / <= a;
    - `{order: [m1, m2, ...], series?, at: mean|last}`: accuracy m1 >= m2 >= ..., and m1 > the last
      (all equal, e.g. all 0%, shows no ordering and does not hold).
    A check naming a model that was not run (`--models`) does not hold.
    Returns (all held, one line per check)."""
    lines, held = [], True
    for c in checks:
        at = c.get("at", "all")
        missing = [m for m in (c["order"] if "order" in c else [c["model"]]) if m not in results]
        if missing:
            lines.append(f"not run: {', '.join(missing)} (a check needs them)")
            held = False
            continue
        if "order" in c:
            accs = [_pick(_series_values(results, m, c.get("series")), at)[0] for m in c["order"]]
            ok = all(a >= b for a, b in zip(accs, accs[1:])) and accs[0] > accs[-1]
            what = " >= ".join(f"{m} {100 * a:.0f}%" for m, a in zip(c["order"], accs))
            lines.append(f"{'held' if ok else 'FAILED'}: {c.get('series', '')} {at}: {what}")
        else:
            accs = _pick(_series_values(results, c["model"], c.get("series")), at)
            ok = all(a >= c["min"] for a in accs) if "min" in c else all(a <= c["max"] for a in accs)
            bound = f">= {100 * c['min']:.0f}%" if "min" in c else f"<= {100 * c['max']:.0f}%"
            lines.append(f"{'held' if ok else 'FAILED'}: {c['model']} {c.get('series', '')} {at} {bound}: "
                         + ", ".join(f"{100 * a:.0f}%" for a in accs))
        held &= ok
    return held, lines


def plot(path: Path, results: dict, xlabel: str, title: str) -> Path:
    """One panel per series: accuracy vs x, one line per model."""
    from .plots import plt

    series = sorted({s for per in results.values() for s in per})
    fig, axes = plt.subplots(1, len(series), figsize=(4.0 * len(series), 3.2), squeeze=False)
    for ax, s in zip(axes[0], series):
        for model, per in results.items():
            if s in per:
                xs = sorted(per[s], key=float)
                ax.plot([float(x) for x in xs], [100 * per[s][x] for x in xs], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-3, 103)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(s, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (1 GPU)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str]) -> int:
    ns = _parse(argv)
    rec = load_repro(ns.name)
    name = Path(rec["path"]).stem
    runs = Path(ns.runs or f"runs/repro/{name}{'_tiny' if ns.tiny else ''}")
    out = Path(ns.out or (runs / "results" if ns.tiny else "docs/results/repro"))
    only = [m.strip() for m in ns.models.split(",")] if ns.models else None
    runs_plan = plan(rec, tiny=ns.tiny, runs=runs, overrides=list(ns.overrides), only=only)

    from lctrain.config import load_config

    for r in runs_plan:  # every run's config (and a niah eval's prompt) is valid before the first one trains
        cfg = load_config(None, r["train_argv"])
        check_niah_eval(rec, ns.tiny, cfg)
    from lctrain.train.command import main as train_main

    from . import niah, task

    evaluate = task.main if rec["eval"]["kind"] == "task" else niah.main
    started = time.time()
    results: dict = {}
    for r in runs_plan:
        t0 = time.time()
        print(f"lctrain repro {name}: {r['model']}" + (f" {rec['sweep']['key']}={r['x']}" if r["x"] is not None else "")
              + f": lctrain train {shlex.join(r['train_argv'])}", flush=True)
        if train_main(r["train_argv"]) != 0:
            raise ReproError(f"training {r['out_dir']} failed (see above)")
        ev_argv, ev = eval_argv(rec, ns.tiny, r["out_dir"])
        if evaluate(ev_argv) != 0:
            raise ReproError(f"evaluating {r['out_dir']} failed (see above)")
        got = read_eval(ev, r["out_dir"])
        per = results.setdefault(r["model"], {})
        for series, value in got.items():
            per.setdefault(series, {}).update({str(r["x"]): value} if r["x"] is not None
                                              else {str(k): v for k, v in value.items()})
        r["wall_s"] = round(time.time() - t0, 1)
    wall = time.time() - started
    held, lines = check_claim(rec["claim"].get("checks", []), results)
    command = "lctrain repro " + shlex.join(argv)
    verdict = ("The claim held" if held else "The claim did NOT hold") + (
        " (--tiny: 2-step smoke run, says nothing about the claim)" if ns.tiny else "")
    report = {"name": name, "claim": rec["claim"]["text"], "held": held, "checks": lines, "command": command,
              "device": device_name(), "wall_s": round(wall, 1), "tiny": ns.tiny, "results": results,
              "runs": runs_plan, "recipe": rec["path"],
              "x": rec["sweep"]["key"] if rec.get("sweep") else "eval length (tokens)"}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    png = plot(out / f"{name}.png", results, report["x"], f"{name}: {rec['claim']['text']}"[:160])
    md = [f"# {name}", "", f"Claim: {rec['claim']['text']}", "", f"**{verdict}.**", "",
          *[f"- {line}" for line in lines], "", f"- command: `{command}`", f"- device: {report['device']}",
          f"- wall time: {wall / 60:.1f} min", "", f"![{name}]({png.name})", "", f"Data: [{name}.json]({name}.json)",
          ""]
    (out / f"{name}.md").write_text("\n".join(md))
    print(f"lctrain repro {name}: {verdict}; wrote {out / (name + '.json')}, {png}, {out / (name + '.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
