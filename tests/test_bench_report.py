"""`lctrain bench record`: a benchmark's JSON result becomes a BENCHMARKS.md section, appended, never rewritten."""
import json

import pytest

from lctrain.bench.report import append_to_benchmarks_md, render
from lctrain.cli import main as cli_main

RESULT = {
    "title": "Kernels: test", "command": "lctrain bench kernels --T 16384", "device": "Some GPU",
    "versions": {"torch": "2.x", "triton": "3.y"}, "date": "2026-01-01 00:00 UTC", "notes": ["a note"],
    "columns": ["T", "method", "fwd+bwd ms"],
    "rows": [[16384, "delta", 3.8437], [32768, "gated_delta", 9.4189]],
}


def test_render_has_command_device_date_and_every_row():
    text = render(RESULT)
    for needle in ("Kernels: test", "lctrain bench kernels --T 16384", "Some GPU", "2026-01-01", "a note", "| 16384 |",
                   "gated_delta"):
        assert needle in text, needle


def test_record_appends_and_keeps_what_was_there(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    append_to_benchmarks_md(RESULT, str(md))
    first = md.read_text()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(dict(RESULT, title="Second run")))
    assert cli_main(["bench", "record", str(path), "--md", str(md)]) == 0
    text = md.read_text()
    assert text.startswith(first) and "Second run" in text


def test_bench_varlen_document_bounds_and_cli():
    """The varlen bench's packed layout: --docs documents of >= 1 token covering T exactly; the
    command is routed and refuses more documents than tokens."""
    import pytest

    from lctrain.bench.varlen import _parse, document_bounds

    b = document_bounds(1000, 64, seed=3)
    assert b[0] == 0 and b[-1] == 1000 and len(b) == 65 and all(x < y for x, y in zip(b, b[1:]))
    assert document_bounds(1000, 64, seed=3) == b
    with pytest.raises(SystemExit):
        _parse(["--T", "10", "--docs", "64"])
    # --paths picks what runs; --no-fla drops fla; --variant times packed, so it needs packed
    a = _parse(["--paths", "packed", "fla", "--no-fla", "--variant", "bv32:BVS=32,BVSB=32", "--methods", "delta"])
    assert a.paths == ["packed"] and a.variants == [("bv32", {"BVS": 32, "BVSB": 32})] and a.ops == ["delta"]
    for bad in (["--paths", "one", "fla", "--variant", "bv32:BVS=32"], ["--variant", "bv32"]):
        with pytest.raises(SystemExit):
            _parse(bad)


def test_record_note_adds_context_without_touching_figures(tmp_path):
    """`lctrain bench record --note` appends the note; the JSON's figures and notes are recorded as they are."""
    from lctrain.bench.report import main as record_main
    result = {"title": "t", "command": "lctrain bench x", "device": "cpu", "date": "2026-11-30",
              "notes": ["from the bench"], "columns": ["T", "ms"], "rows": [[16, 1.25]]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    md = tmp_path / "B.md"
    assert record_main([str(path), "--md", str(md), "--note", "variant B (split2 reverted)"]) == 0
    text = md.read_text()
    assert "- note: from the bench" in text and "- note: variant B (split2 reverted)" in text
    assert "| 16 | 1.25 |" in text
    assert json.loads(path.read_text()) == result


def test_bench_main_publishes_the_result_with_the_command_it_was_given(tmp_path, capsys):
    """bench_main: the argv given becomes args.argv (the recorded command); the result is printed, written
    with --json and appended with --record; result_dict keeps the key order and dates in UTC."""
    import argparse
    import re

    from lctrain.bench.report import bench_main, result_dict

    def parse(argv):
        p = argparse.ArgumentParser()
        p.add_argument("--T", type=int)
        p.add_argument("--json")
        p.add_argument("--record")
        return p.parse_args(argv)

    def run(args):
        return result_dict("t", "lctrain bench x " + " ".join(args.argv), "cpu", {"torch": "2.x"}, ["n"],
                           ["T", "ms"], [[args.T, 1.5]], [{"T": args.T}])

    out, md = tmp_path / "r.json", tmp_path / "B.md"
    assert bench_main(parse, run, ["--T", "16", "--json", str(out), "--record", str(md)]) == 0
    result = json.loads(out.read_text())
    assert list(result) == ["title", "command", "device", "versions", "date", "notes", "columns", "rows", "raw"]
    assert result["command"] == f"lctrain bench x --T 16 --json {out} --record {md}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", result["date"])
    assert "| 16 | 1.5 |" in md.read_text()
    printed = capsys.readouterr().out
    assert "t - cpu {'torch': '2.x'}" in printed and "note: n" in printed and f"recorded in {md}" in printed


def test_write_json_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """write_json goes through a temporary file in the same folder and os.replace: a kill mid-write
    (here json.dump raising after half the text) leaves the previous file as it was, and no stray file."""
    from lctrain.bench import report

    path = tmp_path / "sub" / "r.json"
    report.write_json({"rows": [[1]]}, path)  # the folder is created
    assert json.loads(path.read_text()) == {"rows": [[1]]}

    def killed(obj, f, **kw):
        f.write('{"rows": [[1], [')
        raise KeyboardInterrupt
    monkeypatch.setattr(report.json, "dump", killed)
    try:
        report.write_json({"rows": [[1], [2]]}, path)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the write was not interrupted")
    assert json.loads(path.read_text()) == {"rows": [[1]]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


def test_a_partial_result_is_recorded_as_cut(tmp_path):
    """write_partial marks a copy (partial: true, the note with N of M); `lctrain bench record` takes it and
    the section's heading and note say the run was cut; a partial JSON without the note gets one; the final
    write of the same result carries no mark."""
    from lctrain.bench.report import PARTIAL_HEADING, publish, render, write_partial

    path, md = tmp_path / "r.json", tmp_path / "B.md"
    write_partial(RESULT, path, 2, 5)
    result = json.loads(path.read_text())
    assert result["partial"] is True and "partial" not in RESULT and result["rows"] == RESULT["rows"]
    assert result["notes"] == ["a note", "partial: written after 2 of 5 cases; the run ended before the others "
                                         "(a time limit or a kill)"]
    assert cli_main(["bench", "record", str(path), "--md", str(md), "--note", "call 3"]) == 0
    text = md.read_text()
    assert "## Kernels: test (partial)" in text and "- note: partial: written after 2 of 5 cases" in text
    assert "- note: call 3" in text and "| 32768 | gated_delta | 9.4189 |" in text
    assert PARTIAL_HEADING in render(dict(RESULT, partial=True))
    assert "partial" not in render(RESULT)
    write_partial(RESULT, None, 1, 2)  # no --json: nothing written
    publish(RESULT, str(path))
    assert "partial" not in json.loads(path.read_text())


def test_clock_time_limit_outside_torch_distributed():
    """Clock: no limit never runs out; past the limit it is out of time and stays so; the note names the
    cases not run."""
    import time

    from lctrain.bench.report import Clock

    assert not Clock(None).out_of_time()
    clock = Clock(0.05, "bench x")
    assert not clock.out_of_time()
    time.sleep(0.06)
    assert clock.out_of_time() and clock.out_of_time()
    assert clock.not_run_note([]) == []
    assert clock.not_run_note(["T=64", "T=128"]) == ["--time-limit 0.05 s reached: not run: T=64, T=128"]


# The single-process GPU benches (kernels, varlen, loglinear, deltaformer) need CUDA to time anything; their loop
# (cases, partial JSON, --time-limit) runs here on CPU with CUDA faked: inputs made on the CPU and the timing
# (_measure) replaced by a stand-in that returns figures, sleeps or is killed.
SINGLE_PROCESS_BENCHES = {
    "kernels": ["--T", "64", "128", "--H", "2", "--D", "8", "--methods", "delta", "gated_delta", "--no-fla",
                "--no-sdpa"],
    "varlen": ["--T", "64", "128", "--docs", "2", "--H", "2", "--D", "8", "--ops", "delta", "--paths", "one",
               "packed"],
    "loglinear": ["--T", "64", "128", "--H", "2", "--D", "8", "--methods", "ll_gdn", "gdn"],
    "deltaformer": ["--T", "64", "128", "--H", "2", "--D", "8", "--methods", "ours", "sdpa"],
}


def _fake_gpu(monkeypatch, name, kill_at=None, sleep_s=0.0):
    """The bench module `name` with CUDA faked; its n-th measurement raises KeyboardInterrupt (a kill) when
    n == kill_at."""
    import importlib
    import time

    import torch
    module = importlib.import_module(f"lctrain.bench.{name}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    for fn in ("_make_inputs", "_inputs"):
        if hasattr(module, fn):
            orig = getattr(module, fn)
            monkeypatch.setattr(module, fn, lambda *a, _orig=orig, **k: _orig(*a[:5], device="cpu"))
    if hasattr(module, "_agreement"):
        monkeypatch.setattr(module, "_agreement", lambda *a, **k: None)
    calls = []

    def measure(fwd, inputs, do, warmup, rep):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt  # stands in for the device call's kill
        time.sleep(sleep_s)
        return 1.0 * len(calls), 2.0 * len(calls), 3.0
    monkeypatch.setattr(module, "_measure", measure)
    return module


@pytest.mark.parametrize("name", list(SINGLE_PROCESS_BENCHES))
def test_a_killed_bench_keeps_a_recordable_partial_json(name, tmp_path, monkeypatch):
    """Killed during its third measurement of four (T=128's first), the bench leaves a JSON of the two
    it measured (T=64), marked partial, that `lctrain bench record` takes."""
    module = _fake_gpu(monkeypatch, name, kill_at=3)
    out, md = tmp_path / "r.json", tmp_path / "B.md"
    with pytest.raises(KeyboardInterrupt):
        module.main([*SINGLE_PROCESS_BENCHES[name], "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["partial"] is True and result["device"] == "Fake GPU"
    assert [r[0] for r in result["rows"]] == [64, 64]
    assert any(n.startswith("partial: written after 2 of 4 measurements") for n in result["notes"])
    assert cli_main(["bench", "record", str(out), "--md", str(md)]) == 0
    assert "(partial)" in md.read_text() and "| 64 |" in md.read_text()


@pytest.mark.parametrize("name", list(SINGLE_PROCESS_BENCHES))
def test_bench_time_limit_stops_starting_cases(name, tmp_path, monkeypatch):
    """--time-limit: the first measurement runs past the limit, the others are not started and are named in
    the notes; the run ends normally and its JSON is final (not partial)."""
    module = _fake_gpu(monkeypatch, name, sleep_s=0.6)
    out = tmp_path / "r.json"
    assert module.main([*SINGLE_PROCESS_BENCHES[name], "--time-limit", "0.5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "partial" not in result and len(result["rows"]) == 1 and result["rows"][0][0] == 64
    note = next(n for n in result["notes"] if n.startswith("--time-limit 0.5 s reached: not run: "))
    assert note.endswith("T=128 (all)") and "T=64 " in note


def test_error_note_keeps_the_reason_at_the_end_of_a_long_error(capsys):
    """A Triton CompilationError starts with kernel source and ends with the reason: the note keeps both ends,
    and the whole traceback goes to stderr (the run's log)."""
    from lctrain.bench.report import error_note

    try:
        raise RuntimeError("at 177:18:\n        b_g = tl.load(p_g, mask=m_t, other=0.0)\n" + "x\n" * 50
                           + "ValueError: incompatible dimensions at index 0: 64 and 16")
    except RuntimeError as err:
        note = error_note(err)
    assert note.startswith("RuntimeError: at 177:18:")
    assert note.endswith("incompatible dimensions at index 0: 64 and 16")
    assert "Traceback" in capsys.readouterr().err
    try:
        raise KeyError("one line")
    except KeyError as err:
        assert error_note(err) == "KeyError: 'one line'"


def test_a_note_of_many_lines_is_recorded_on_one():
    from lctrain.bench.report import render

    md = render({"title": "t", "command": "c", "device": "d", "notes": ["failed: at 1:2:\n    x = 1\n\n  y"],
                 "columns": ["a"], "rows": [[1]]})
    assert "- note: failed: at 1:2: x = 1 y\n" in md
