"""User errors: the one exception family the CLI turns into one line and exit code 2.

Every error caused by what the user gave (a config value, a path, a file, a checkpoint that does
not fit) derives from `UserError`; its message names what to change. `lctrain`'s entry point
(`lctrain.cli.main`) catches it and prints one line, never a traceback; anything else is an
internal error and keeps its traceback.

A worker of a multi-process run (started by torchrun, ours or the user's) has no terminal of its
own that the user reads last: it also writes the line into torchrun's per-worker error file
(TORCHELASTIC_ERROR_FILE), tagged `USER_ERROR_TAG`, so the launcher can print that line instead of
torchrun's generic failure text.
"""
from __future__ import annotations

import json
import os
import sys
import time

USER_ERROR_EXIT = 2
USER_ERROR_TAG = "lctrain_user_error"


class UserError(Exception):
    """Something the user gave is wrong; the message says what to change (exit code 2, one line)."""


def one_line(text: str) -> str:
    """The message on a single line (nested causes may carry newlines)."""
    return " ".join(str(text).split())


def report_user_error(prog: str, err: BaseException) -> int:
    """Print `prog: error: <message>` on one line to stderr (and into a torchrun error file); -> 2."""
    line = one_line(err)
    if not line.startswith("lctrain"):
        line = f"{prog}: error: {line}"
    print(line, file=sys.stderr, flush=True)
    write_worker_error(line)
    return USER_ERROR_EXIT


def write_worker_error(line: str) -> None:
    """Under torchrun, leave the line where the launcher reads a failed worker's message."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time()), USER_ERROR_TAG: True}, f)
    except OSError:
        pass  # the line is on stderr already
