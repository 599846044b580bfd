"""`lctrain bench train` on CPU: real steps of a tiny recipe, its JSON and BENCHMARKS.md section; the
length search; the FLOP count it divides by."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lctrain.bench import train as bench_train
from lctrain.config import load_config
from lctrain.models import build_model

TINY = ["data.seq_len=64", "data.micro_batch_size=1", "model.d_model=64", "model.layer_pattern=GS", "model.window=16",
        "model.activation_checkpointing=selective:G", "train.loss_chunk_tokens=24"]


def test_bench_train_runs_two_steps_and_writes_json(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "B.md"
    assert bench_train.main([*TINY, "train.grad_accum=2", "--steps", "2", "--warmup", "0", "--profile",
                             "--json", str(out), "--record", str(md)]) == 0
    result = json.loads(out.read_text())
    assert len(result["losses"]) == 2 and all(loss > 0 for loss in result["losses"])
    assert result["tokens_per_s"] > 0 and result["step_s"] > 0
    assert result["mfu_percent"] is None  # CPU: no peak to divide by
    split = result["time_split_ms"]
    assert set(split["fwd"]) == set(split["bwd"]) == {"G", "S"}
    assert all(v > 0 for v in [*split["fwd"].values(), *split["bwd"].values()])
    # both micro-batches are counted (the hooks fire once per micro-batch), the optimizer on its own,
    # and the parts add up to the step
    assert split["micro_batches"] == 2 and split["optimizer"] > 0 and split["gradients"] > 0
    parts = (sum(split["fwd"].values()) + sum(split["bwd"].values()) + split["head_loss"] + split["micro_rest"]
             + split["gradients"] + split["optimizer"] + split["other"])
    assert parts == pytest.approx(split["step"])
    assert split["micro_rest"] >= 0 and split["other"] >= 0
    # --profile: the op table and the chrome trace beside the JSON
    prof = result["profile"]
    assert prof["top"] and prof["busy_ms"] > 0 and any("mm" in r["name"] for r in prof["top"])
    assert (tmp_path / "profile_kernels.txt").read_text().startswith("profile of one step")
    assert (tmp_path / "profile_trace.json.gz").stat().st_size > 0
    row = dict(zip(result["columns"], result["rows"][0]))
    assert row["seq_len"] == 64 and row["checkpointing"] == "selective:G, loss chunk 24"
    assert "Training step: default at 64 tokens" in md.read_text()


def test_bench_train_length_search_on_cpu(tmp_path):
    out = tmp_path / "len.json"
    assert bench_train.main([*TINY, "--lengths", "64", "32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r[1] for r in result["rows"]] == [32, 64] and result["longest_seq_len"] == 64
    assert "partial" not in result


def test_length_search_cut_short_leaves_a_recordable_partial_result(tmp_path, monkeypatch):
    """A search killed after its first length (a device call's time limit) keeps a JSON that
    `lctrain bench record` accepts, marked partial."""
    from lctrain.bench.report import append_to_benchmarks_md

    calls = []

    def pinned(device):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the second length never finishes
        return 0.0
    monkeypatch.setattr(bench_train, "_host_pinned_gib", pinned)
    out = tmp_path / "len.json"
    with pytest.raises(KeyboardInterrupt):
        bench_train.main([*TINY, "--lengths", "32", "64", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["partial"] and [r[1] for r in result["rows"]] == [32] and result["longest_seq_len"] == 32
    append_to_benchmarks_md(result, str(tmp_path / "B.md"))
    assert "Longest context of one training step" in (tmp_path / "B.md").read_text()


def test_length_search_time_limit_starts_no_new_length(tmp_path, monkeypatch):
    """--time-limit: the first length runs past the limit, the next is not started and is named in the notes
    of the final (not partial) result."""
    import time

    monkeypatch.setattr(bench_train, "_host_pinned_gib", lambda device: time.sleep(0.6))
    out = tmp_path / "len.json"
    assert bench_train.main([*TINY, "--lengths", "32", "64", "--time-limit", "0.5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r[1] for r in result["rows"]] == [32] and "partial" not in result
    assert "--time-limit 0.5 s reached: not run: 64" in result["notes"]


def test_bench_train_refuses_a_bad_length_before_work(capsys):
    # a length that does not split into cp * chunk_size shards is refused by the config check
    assert bench_train.main([*TINY, "parallel.cp=2", "--lengths", "64", "100"]) == 2
    assert "data.seq_len" in capsys.readouterr().err


def test_attention_flops_count_the_keys_each_query_sees():
    cfg = load_config(None, TINY)
    model = build_model(cfg.model)
    T, w = 64, 16
    flops = bench_train.model_flops_per_step(model, cfg, T, sequences=3)
    keys = sum(min(t + 1, w) for t in range(T))  # the S layer's sliding window
    assert flops["attention"] == pytest.approx(12 * cfg.model.attn_heads * cfg.model.attn_head_dim * keys * 3)
    assert flops["dense"] == pytest.approx(6 * flops["matmul_params"] * T * 3)


def test_activation_memory_parts_add_up(tmp_path):
    """Per token, the block keeps what its two halves keep (the residual adds save nothing), and the
    numbers do not depend on the length (weights cancel out)."""
    import torch

    cfg = load_config(None, TINY)
    kib = bench_train.saved_kib_per_token(cfg, torch.device("cpu"))
    assert set(kib) == {"G", "S"}
    for kind, v in kib.items():
        assert v["mixer"] > 0 and v["mlp"] > 0, (kind, v)
        assert v["block"] == pytest.approx(v["mixer"] + v["mlp"], rel=1e-6), (kind, v)
    kib_two_lengths = bench_train.saved_kib_per_token(cfg, torch.device("cpu"), lengths=(64, 320))
    assert kib_two_lengths["S"]["mlp"] == pytest.approx(kib["S"]["mlp"])
    out = tmp_path / "mem.json"
    assert bench_train.main([*TINY, "--activation-memory", "--json", str(out)]) == 0
    assert [r[0] for r in json.loads(out.read_text())["rows"]] == ["G", "S"]


@pytest.mark.parametrize("flags", [["--lengths", "64", "--steps", "3"], ["--activation-memory", "--no-split"],
                                   ["--lengths", "64", "--profile"],
                                   ["--lengths", "64", "--activation-memory"], ["--time-limit", "60"]])
def test_bench_train_refuses_options_its_mode_would_ignore(flags, capsys):
    with pytest.raises(SystemExit) as err:
        bench_train.main([*TINY, *flags])
    assert err.value.code == 2 and "--" in capsys.readouterr().err


def test_bench_layouts_runs_each_layout_and_compares_held_memory(tmp_path):
    """`lctrain bench layouts` on CPU: a one-process row and a tp=2 row (gloo) from real `lctrain train` runs,
    a layout past --time-limit listed as not run; the held-memory fractions from GPU-like rows."""
    from lctrain.bench import layouts

    out = tmp_path / "layouts.json"
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "default.yaml")
    assert layouts.main([recipe, *TINY, "train.grad_accum=1", "--layouts", "tp=1", "tp=2", "pp=2", "--steps", "2",
                         "--warmup", "1", "--time-limit", "0.001", "--out-dir", str(tmp_path / "runs"), "--json",
                         str(out)]) == 0
    rows = {r[0]: dict(zip(layouts.COLUMNS, r)) for r in json.loads(out.read_text())["rows"]}
    assert rows["tp=1"]["status"] == "ok" and rows["tp=1"]["processes"] == 1 and rows["tp=1"]["tokens/s"] > 0
    assert rows["tp=2"]["status"].startswith("not run") and rows["pp=2"]["status"].startswith("not run")
    # the fraction note, from rows as a GPU run writes them
    gpu_rows = [["tp=1", 1, 10, 10, 900, 400, 1.0, "ok"], ["tp=2", 2, 18, 9, 600, 210, 1.0, "ok"],
                ["pp=2", None, None, None, None, None, None, "exit 2: refused"]]
    assert layouts.held_ratio_notes(gpu_rows) == ["held memory per GPU / tp=1 (one GPU): tp=2 0.53"]
    assert layouts.held_ratio_notes(gpu_rows[1:]) == []
    assert layouts.throughput_ratio_notes(gpu_rows) == ["tokens/s per GPU / tp=1 (one GPU): tp=2 0.90"]


def test_bench_layouts_items_with_a_dot_are_whole_config_keys():
    """`cp=2,data.seq_len=131072`: a parallel key and a length in one layout (weak scaling in one bench)."""
    from lctrain.bench.layouts import _layout_overrides

    assert _layout_overrides("cp=2,data.seq_len=131072") == ["parallel.cp=2", "data.seq_len=131072"]
    assert _layout_overrides("tp=2, sequence_parallel=true") == ["parallel.tp=2", "parallel.sequence_parallel=true"]
    with pytest.raises(SystemExit, match="not key=value"):
        _layout_overrides("tp2")


def test_bench_layouts_keeps_the_rows_of_a_cut_run(tmp_path, monkeypatch):
    """A run killed during its second layout (a device call's limit) leaves a recordable JSON of the first."""
    from lctrain.bench import layouts
    from lctrain.bench.report import append_to_benchmarks_md

    def fake_run_layout(recipe, overrides, layout, *rest):
        if layout != "tp=1":
            raise KeyboardInterrupt  # stands in for the kill
        return [layout, 1, 100, 100, 900, 400, 5.0, "ok"]

    monkeypatch.setattr(layouts, "run_layout", fake_run_layout)
    out = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        layouts.main(["r.yaml", "--layouts", "tp=1", "pp=2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["partial"] and [r[0] for r in result["rows"]] == ["tp=1"]
    assert any("partial: written after 1 of 2 layouts" in n for n in result["notes"])
    append_to_benchmarks_md(result, str(tmp_path / "B.md"))
    assert "| tp=1 | 1 | 100 |" in (tmp_path / "B.md").read_text()
