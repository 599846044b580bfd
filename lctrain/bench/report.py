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

BENCHMARKS.md is written only through this module: figures are never typed by hand.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

REQUIRED = ("title", "command", "device", "columns", "rows")
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
    lines = [f"## {r['title']}", ""]
    lines.append(f"- command: `{r['command']}`")
    lines.append(f"- device: {r['device']}" + (f" ({ver})" if ver else ""))
    if r.get("date"):
        lines.append(f"- date: {r['date']}")
    for note in r.get("notes") or []:
        lines.append(f"- note: {note}")
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
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
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
