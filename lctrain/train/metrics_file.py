"""metrics.jsonl across restarts: each step once, and a record marking each restart.

A resumed run redoes the steps after its checkpoint (identically: resume is bit-exact), so their
old records are dropped when it starts, and `{"event": "resume", "step": n, ...}` is appended:
the file then holds every step once, in order, and says where the run restarted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def restart_metrics(path: Path, start_step: int, checkpoint: str | None) -> None:
    """Keep the records of steps <= start_step (and earlier events), then note the (re)start."""
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if int(rec.get("step", 0)) <= start_step:
                kept.append(line)
    if not kept and start_step == 0:
        if path.exists():
            path.unlink()
        return
    kept.append(json.dumps({"event": "resume", "step": start_step, "checkpoint": checkpoint}))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("\n".join(kept) + "\n")
    os.replace(tmp, path)


def step_records(path: Path) -> list[dict]:
    """The per-step records (events left out)."""
    return [r for r in (json.loads(x) for x in path.read_text().splitlines()) if "event" not in r]
