"""`lctrain repro` (lctrain/eval/repro.py): how checks decide a claim, the run plan (joint sweeps,
point-major order, --points), --budget-minutes, and every recipe in recipes/repro run 2 tiny CPU steps
per model end to end (plumbing only: the claim itself needs the GPU sizes)."""
import json
from pathlib import Path

import pytest
import torch

from lctrain.config import load_config
from lctrain.eval import repro

RECIPES = sorted(p.stem for p in repro.RECIPE_DIR.glob("*.yaml"))


def test_check_claim():
    res = {"a": {"mqar": {"8": 1.0, "64": 0.95}}, "b": {"mqar": {"8": 0.9, "64": 0.2}}}
    assert repro.check_claim([{"model": "a", "at": "all", "min": 0.9}, {"order": ["a", "b"], "at": "last"}], res)[0]
    assert not repro.check_claim([{"model": "b", "at": "all", "min": 0.9}], res)[0]
    assert repro.check_claim([{"model": "b", "at": "all", "min": 0.9, "from": 9}], res)[0] is False
    assert repro.check_claim([{"model": "b", "at": "all", "max": 0.5, "from": 9}], res)[0]  # only x=64 counts
    tie = {"a": {"x": {"1": 0.0}}, "b": {"x": {"1": 0.0}}}
    assert not repro.check_claim([{"order": ["a", "b"], "at": "last"}], tie)[0]  # all 0%: no ordering shown
    assert not repro.check_claim([{"model": "c", "min": 0.1}], res)[0]  # not run
    assert not repro.check_claim([{"model": "a", "from": 100, "min": 0.0}], res)[0]  # nothing left to check


def test_check_claim_on_losses():
    """position_loss: lower is better; improves_after = the last value beats the one at that x."""
    loss = {"ll": {"loss": {"10.0": 3.0, "300.0": 2.0, "1500.0": 1.8}},
            "g": {"loss": {"10.0": 2.9, "300.0": 2.1, "1500.0": 2.1}}}
    ok, lines = repro.check_claim([{"order": ["ll", "g"], "series": "loss", "at": "mean", "from": 256},
                                   {"model": "ll", "series": "loss", "improves_after": 256}], loss,
                                  lower_is_better=True)
    assert ok and all(line.startswith("held") for line in lines) and "1.8000" in lines[1]
    assert not repro.check_claim([{"order": ["ll", "g"], "series": "loss", "at": "mean"}], loss,
                                 lower_is_better=False)[0]
    assert not repro.check_claim([{"model": "g", "series": "loss", "improves_after": 256}], loss,
                                 lower_is_better=True)[0]  # flat after 300: not still falling
    assert not repro.check_claim([{"model": "g", "series": "loss", "improves_after": 4096}], loss,
                                 lower_is_better=True)[0]  # no position that far


def test_plan_joint_sweep_point_major_and_points(tmp_path):
    rec = repro.load_repro("loglinear_mqar")
    runs = repro.plan(rec, tiny=False, runs=tmp_path, overrides=["train.steps=5"], only=None)
    assert [(r["model"], r["x"]) for r in runs] == [("gated_deltanet", 32), ("loglinear_gdn", 32),
                                                    ("gated_deltanet", 128), ("loglinear_gdn", 128)]
    last = runs[-1]["train_argv"]
    assert "data.task.num_pairs=128" in last and "data.seq_len=1024" in last and "data.micro_batch_size=32" in last
    assert last.index("data.seq_len=1024") < last.index("train.steps=5") < last.index(f"train.out_dir={tmp_path}/"
                                                                                    "loglinear_gdn_128")
    cfg = load_config(None, last)
    assert (cfg.data.seq_len, cfg.data.task.num_pairs, cfg.model.layer_pattern) == (1024, 128, "LL")
    assert cfg.train.steps == 5  # a command-line override beats the point's own train.steps
    only = repro.plan(rec, tiny=False, runs=tmp_path, overrides=[], only=["loglinear_gdn"], points=["128"])
    assert [(r["model"], r["x"]) for r in only] == [("loglinear_gdn", 128)]
    with pytest.raises(repro.ReproError, match="--points"):
        repro.plan(rec, tiny=False, runs=tmp_path, overrides=[], only=None, points=["77"])
    with pytest.raises(repro.ReproError, match="no sweep"):
        repro.plan(repro.load_repro("sniah_ordering"), tiny=False, runs=tmp_path, overrides=[], only=None,
                   points=["1"])


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("claim: {text: x, checks: []}\nmodels: {a: {}}\neval: {kind: task}\n"
                   "sweep: {key: data.seq_len, values: [32, 64], with: {data.micro_batch_size: [4]}}\n")
    with pytest.raises(repro.ReproError, match="sweep.with.data.micro_batch_size holds 1 values"):
        repro.load_repro(str(bad))
    bad.write_text("claim: {text: x, checks: [{model: a, order: [a, b]}]}\nmodels: {a: {}}\neval: {kind: task}\n")
    with pytest.raises(repro.ReproError, match=r"claim.checks\[0\]"):
        repro.load_repro(str(bad))
    with pytest.raises(repro.ReproError, match="no repro recipe"):
        repro.load_repro("no_such_claim")


def test_repro_refuses_a_niah_length_too_short_before_training():
    rec = repro.load_repro("sniah_ordering")
    rec["tiny"]["eval"]["lengths"] = [256]
    with pytest.raises(repro.ReproError, match="length 256"):
        repro.check_niah_eval(rec, True, load_config(None, []))


def _run_tiny(tmp_path, name, *extra):
    assert repro.main([name, "--tiny", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *extra,
                       f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    return json.loads((tmp_path / "out" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", RECIPES)
def test_repro_recipe_runs_tiny(tmp_path, name):
    """Every recipe, every model, 2 CPU steps each: trains, evaluates, checks, writes JSON/PNG/MD."""
    report = _run_tiny(tmp_path, name)
    rec = repro.load_repro(name)
    assert sorted(report["results"]) == sorted(rec["models"])
    values = [v for per in report["results"].values() for s in per.values() for v in s.values()]
    assert values and all(v == v for v in values)  # no NaN
    if report["metric"] == "accuracy":
        assert all(0.0 <= v <= 1.0 for v in values)
    assert len(report["checks"]) == len(rec["claim"]["checks"]) and report["decided"]
    assert report["tiny"] and report["command"].startswith(f"lctrain repro {name}") and report["device"]
    assert all(r["steps"] == 2 for r in report["runs"])
    assert (tmp_path / "out" / f"{name}.png").stat().st_size > 0
    assert "smoke run" in (tmp_path / "out" / f"{name}.md").read_text()


def test_budget_stops_starting_runs_and_leaves_the_claim_undecided(tmp_path):
    report = _run_tiny(tmp_path, "mqar_deltanet", "--budget-minutes", "0.0001")
    assert [r["model"] for r in report["runs"]] == ["deltanet"]  # the first run always goes
    assert report["skipped"] == [str(Path(tmp_path / "runs" / "gla_mamba2_4"))]
    assert not report["held"] and not report["decided"]
    md = (tmp_path / "out" / "mqar_deltanet.md").read_text()
    assert "NOT decided" in md and "not run (--budget-minutes 0.0001): gla_mamba2 at 4" in md


def test_jobs_train_side_by_side_and_give_the_sequential_results(tmp_path):
    """--jobs 2: both runs train at once as `lctrain train` processes (their logs kept), the evals follow in the
    plan's order, and the results equal one run after the other (same seeds, same data)."""
    one = _run_tiny(tmp_path / "seq", "mqar_deltanet")
    two = _run_tiny(tmp_path / "par", "mqar_deltanet", "--jobs", "2")
    assert [r["model"] for r in two["runs"]] == [r["model"] for r in one["runs"]] == ["deltanet", "gla_mamba2"]
    assert two["results"] == one["results"] and two["decided"]
    assert all(r["train_s"] > 0 and r["wall_s"] >= r["train_s"] for r in two["runs"])
    logs = sorted(p.name for p in (tmp_path / "par" / "runs" / "logs").iterdir())
    assert logs == ["deltanet_4.train.log", "gla_mamba2_4.train.log"]
    assert "lctrain train: done" in (tmp_path / "par" / "runs" / "logs" / "deltanet_4.train.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA: the run must fail at start")
def test_a_failed_side_by_side_run_stops_the_repro_with_its_log(tmp_path):
    """train.device=cuda passes the config check and fails in the training process on a CPU machine: the repro
    stops with that process's log, not a silent gap in the results."""
    failed = r"(?s)training .*(deltanet|gla_mamba2)_4 failed.*no CUDA device is visible"
    with pytest.raises(repro.ReproError, match=failed):
        _run_tiny(tmp_path, "mqar_deltanet", "--jobs", "2", "train.device=cuda")


def test_expected_wall_uses_the_models_own_last_run():
    done = [{"model": "g", "wall_s": 10.0}, {"model": "ll", "wall_s": 40.0}, {"model": "g", "wall_s": 8.0}]
    assert repro.expected_wall(done, "ll") == 40.0 and repro.expected_wall(done, "g") == 8.0
    assert repro.expected_wall(done, "new") == pytest.approx(58.0 / 3)


def test_report_written_mid_repro_says_it_is_not_finished(tmp_path):
    """After each run the report is rewritten; until the last run it must not claim a verdict."""
    rec = repro.load_repro("mqar_deltanet")
    runs = repro.plan(rec, tiny=True, runs=tmp_path, overrides=[], only=None)
    for r in runs:
        r.update(steps=2, wall_s=1.0)
    res = {"deltanet": {"mqar": {"4": 1.0}}}
    verdict, lines = repro.write_report(tmp_path, rec, ["mqar_deltanet"], tiny=False, budget=None, results=res,
                                        done=runs[:1], skipped=[], pending=runs[1:], wall=2.0)
    report = json.loads((tmp_path / "mqar_deltanet.json").read_text())
    assert "has not finished" in verdict and lines[-1] == "not run yet: gla_mamba2 at 4"
    assert not report["held"] and not report["decided"] and not report["finished"]
    assert "has not finished" in (tmp_path / "mqar_deltanet.md").read_text()


def test_runs_that_skipped_updates_leave_the_claim_undecided(tmp_path):
    """A model whose optimizer steps were skipped on NaN gradients trained less than its rivals: even where its
    checks pass, the claim is not decided, and the report names the run and the count."""
    rec = repro.load_repro("mqar_deltanet")
    runs = repro.plan(rec, tiny=True, runs=tmp_path, overrides=[], only=None)
    (tmp_path / "gla_run").mkdir()
    (tmp_path / "gla_run" / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 1.0, "bad_steps": 0}\n{"step": 2, "loss": NaN, "bad_steps": 1}\n'
        '{"step": 3, "loss": 1.0, "bad_steps": 1}\n')
    assert repro.skipped_updates(tmp_path / "gla_run") == 1 and repro.skipped_updates(tmp_path / "none") == 0
    for r, bad in zip(runs, (0, 1)):
        r.update(steps=3, wall_s=1.0, skipped_updates=bad)
    res = {"deltanet": {"mqar": {"4": 1.0}}, "gla_mamba2": {"mqar": {"4": 0.0}}}
    verdict, lines = repro.write_report(tmp_path, rec, ["mqar_deltanet"], tiny=False, budget=None, results=res,
                                        done=runs, skipped=[], pending=[], wall=2.0)
    report = json.loads((tmp_path / "mqar_deltanet.json").read_text())
    assert "NOT decided" in verdict and not report["held"] and not report["decided"]
    assert "updates skipped on non-finite gradients: gla_mamba2 at 4 1 of 3" in lines
    assert "| gla_mamba2 | 4 | 3 | 1 |" in (tmp_path / "mqar_deltanet.md").read_text()


def test_plan_flag_prints_the_runs_and_trains_nothing(tmp_path, capsys):
    assert repro.main(["loglinear_mqar", "--plan", "--runs", str(tmp_path / "runs"), "--points", "128"]) == 0
    out = capsys.readouterr().out
    # the recipe's steps per sweep point (sweep.with.train.steps): 2 x 2400 at 128 pairs
    assert "2 runs, 4800 steps in all" in out and "data.seq_len=1024" in out and "steps=2400" in out
    assert not (tmp_path / "runs").exists()
