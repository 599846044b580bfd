"""`lctrain bench record RESULT.json`: append a benchmark result to BENCHMARKS.md.

A result is a dict (or a JSON file of one) with the keys every benchmark writes:

    title    str                  heading of the section
    command  str                  the command that produced it
    device   str                  GPU name
    versions dict[str, str|None]  e.g. torch / triton / fla-core
    date     str
    notes    list[str]            optional
    columns  list[str]
    rows     list[list]           one list per table row, None rendered as "—"
    partial  bool                 optional: the run was cut (a time limit or a kill) after these rows

BENCHMARKS.md is written only through this module: figures are never typed by hand.

A bench's time on a GPU machine is bounded (a device call is killed at its limit), so every bench that
writes ``--json`` keeps what it measured when it is cut: :func:`write_partial` rewrites the JSON after
every case, marked ``"partial": true`` with a note saying after how many of how many cases it was written,
and the final write (:func:`publish`) replaces it without the mark; every write goes through
:func:`write_json` (a temporary file in the same folder, then ``os.replace``), so a kill mid-write never
leaves half a file. ``--time-limit S`` (:class:`Clock`) starts no new case after S seconds, agreed between
the ranks of a multi-rank bench; the cases it skipped are named in the result's notes. A partial result is
a real measurement of its rows: ``lctrain bench record`` takes it and its section says that the run was cut.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

REQUIRED = ("title", "command", "device", "columns", "rows")
PARTIAL_NOTE = ("partial: written after {done} of {total} {unit}; the run ended before the others "
                "(a time limit or a kill)")
PARTIAL_HEADING = "partial: the run was cut before every case was measured"
HEADER = ("# Benchmarks\n\nWritten by `lctrain bench record` from the JSON results of `lctrain bench "
          "...` commands; never edited by hand.\n")


def _load(result) -> dict:
    if isinstance(result, (str, os.PathLike)):
        with open(result) as f:
            result = json.load(f)
    if not isinstance(result, dict):
        raise TypeError(f"a benchmark result must be a dict or a JSON file of one, got {type(result).__name__}")
    missing = [k for k in REQUIRED if k not in result]
    if missing:
        raise ValueError(f"benchmark result lacks keys {missing}; it needs {list(REQUIRED)}")
    return result


def _cell(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:g}"
    return str(x).replace("|", "\\|")


def render(result) -> str:
    """The markdown section for one result."""
    r = _load(result)
    versions = r.get("versions") or {}
    ver = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
    lines = [f"## {r['title']}" + (" (partial)" if r.get("partial") else ""), ""]
    lines.append(f"- command: `{r['command']}`")
    lines.append(f"- device: {r['device']}" + (f" ({ver})" if ver else ""))
    if r.get("date"):
        lines.append(f"- date: {r['date']}")
    notes = list(r.get("notes") or [])
    if r.get("partial") and not any(str(n).startswith("partial:") for n in notes):
        notes.append(PARTIAL_HEADING)  # a partial result written before the note existed says so all the same
    for note in notes:  # one line each: a note holding an error's kernel source would break the list
        lines.append("- note: " + " ".join(str(note).split()))
    lines.append("")
    cols = r["columns"]
    lines.append("| " + " | ".join(_cell(c) for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in r["rows"]:
        if len(row) != len(cols):
            raise ValueError(f"row {row} has {len(row)} cells, the table has {len(cols)} columns")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def append_to_benchmarks_md(result_json_path_or_dict, md_path: str = "BENCHMARKS.md") -> str:
    """Render a result and append it to ``md_path`` (created with a header if absent).
    Returns the appended section."""
    section = render(result_json_path_or_dict)
    exists = os.path.exists(md_path)
    with open(md_path, "a") as f:
        if not exists:
            f.write(HEADER)
        f.write("\n" + section)
    return section


def format_table(columns, rows) -> str:
    """A plain-text table for the terminal (None as "—")."""
    cells = [[("—" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(columns)]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def utc_date(fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
    """Now in UTC, as the benchmarks date their results."""
    return _dt.datetime.now(_dt.timezone.utc).strftime(fmt)


def write_json(obj, path) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: into a temporary file in the same folder, flushed to
    disk, then ``os.replace``d over ``path``; a kill mid-write leaves the previous file (or none), never
    half a file. The folder is created if needed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def error_note(err: BaseException, limit: int = 300) -> str:
    """A failed case's note: the error's type, its first line and its LAST line (a Triton CompilationError
    begins with the kernel's source and ends with the reason: fla's log-linear kernel on Triton 3.6 was
    recorded as 'CompilationError: at 177:18: b_g = tl.load(...' and nothing more). The whole traceback goes to
    stderr, into the run's log."""
    import traceback

    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = "" if not lines else lines[0] if len(lines) == 1 else f"{lines[0][:80]} ... {lines[-1]}"
    return f"{type(err).__name__}: {text[:limit]}"


def partial_result(result: dict, done: int, total: int, unit: str = "cases") -> dict:
    """A copy of ``result`` marked as cut: ``"partial": true`` and the note "partial: written after
    ``done`` of ``total`` ``unit``; ..." after its own notes."""
    note = PARTIAL_NOTE.format(done=done, total=total, unit=unit)
    return {**result, "notes": [*(result.get("notes") or []), note], "partial": True}


def write_partial(result: dict, path, done: int, total: int, unit: str = "cases") -> None:
    """Rewrite ``path`` (a bench's ``--json``; nothing when None) with the rows measured so far, marked
    partial (:func:`partial_result`), atomically: called after every case, so a run cut by a time limit or
    a kill keeps what it measured in a form ``lctrain bench record`` takes. The final write (:func:`publish`)
    replaces it without the mark. Multi-rank benches call it on rank 0 only."""
    if path:
        write_json(partial_result(result, done, total, unit), path)


def time_limit_seconds(text: str) -> float:
    """argparse ``type`` of every bench's ``--time-limit S``: seconds, > 0 (what :class:`Clock` takes)."""
    import argparse

    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


class Clock:
    """Elapsed time of a bench run and its ``--time-limit S``: start no new case after S seconds.

    Under torch.distributed (initialised, more than one rank in ``group``; None: the default group) the
    elapsed time is agreed between the ranks (the largest, by an all-reduce), so every rank stops at the same
    case and the collectives stay matched: every rank must then call :meth:`out_of_time` at the same points.
    Once out of time it stays so (no further collective). Progress lines go to rank 0's stderr."""

    def __init__(self, limit_s: float | None = None, name: str = "bench", *, rank: int = 0, group=None,
                 device=None):
        self.t0, self.limit, self.name = time.perf_counter(), limit_s, name
        self.rank, self.group, self.device = rank, group, device
        self._out = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def progress(self, what: str) -> None:
        if self.rank == 0:
            print(f"[{self.name} {self.elapsed():7.1f} s] {what}", file=sys.stderr, flush=True)

    def _distributed(self) -> bool:
        try:
            import torch.distributed as dist
        except ImportError:
            return False
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def out_of_time(self) -> bool:
        if self.limit is None or self._out:
            return self._out
        elapsed = self.elapsed()
        if self._distributed():
            import torch
            import torch.distributed as dist
            t = torch.tensor([elapsed], dtype=torch.float64,
                             device=self.device if dist.get_backend(self.group) == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            elapsed = t.item()
        self._out = elapsed > self.limit
        return self._out

    def not_run_note(self, skipped: list[str]) -> list[str]:
        """The note naming the cases --time-limit skipped ([] when none)."""
        if not skipped:
            return []
        return [f"--time-limit {self.limit:g} s reached: not run: " + ", ".join(skipped)]


def result_dict(title: str, command: str, device: str, versions: dict, notes: list, columns: list, rows: list,
                raw: list | None = None, *, date: str | None = None, **extra) -> dict:
    """A benchmark result with the keys in the order every bench writes them (``raw`` only when given,
    then any ``extra`` keys); ``date`` defaults to :func:`utc_date`."""
    result = {"title": title, "command": command, "device": device, "versions": versions,
              "date": utc_date() if date is None else date, "notes": notes, "columns": columns, "rows": rows}
    if raw is not None:
        result["raw"] = raw
    result.update(extra)
    return result


def bench_main(parse, run, argv: list[str] | None = None) -> int:
    """The ``main`` of a bench: parse ``argv`` (default ``sys.argv[1:]``), keep it as ``args.argv`` (the
    recorded command), run, and :func:`publish` the result (``--record`` where the bench has it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    args.argv = argv
    publish(run(args), args.json, getattr(args, "record", None))
    return 0


def publish(result: dict, json_path: str | None = None, record_md: str | None = None) -> None:
    """What every benchmark does with its result: print it, write it as JSON to ``json_path`` and
    append it to ``record_md`` (BENCHMARKS.md) when asked."""
    versions = result.get("versions")
    print()
    print(result["title"], "-", result["device"], *([versions] if versions else []))
    for n in result.get("notes") or []:
        print("note:", n)
    print(format_table(result["columns"], result["rows"]))
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}")
    if record_md:
        append_to_benchmarks_md(result, record_md)
        print(f"recorded in {record_md}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lctrain bench record",
                                description="append benchmark results (JSON) to BENCHMARKS.md")
    p.add_argument("results", nargs="+", help="result JSON file(s) written by `lctrain bench ... --json`")
    p.add_argument("--md", default="BENCHMARKS.md", help="markdown file to append to (default BENCHMARKS.md)")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="context the JSON does not carry (which code variant, which device call), "
                        "recorded as a note of each result; repeatable")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for path in args.results:
        result = path
        if args.note:
            with open(path) as f:
                result = json.load(f)
            result["notes"] = [*(result.get("notes") or []), *args.note]
        append_to_benchmarks_md(result, args.md)
        print(f"recorded {path} in {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
