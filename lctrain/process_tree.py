"""Worker processes never outlive the launcher that started them.

torchrun starts each worker in its own session (start_new_session), so a launcher killed with
SIGKILL, which cannot forward anything, used to leave its workers training and saving into the
out_dir a rerun then also writes. Each worker therefore asks the kernel (Linux prctl
PR_SET_PDEATHSIG) for SIGKILL when its parent dies. Nothing is lost that a graceful stop would
keep: checkpoints are written atomically, so a worker killed mid-save leaves the previous one.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def is_torchrun_worker() -> bool:
    """True in a process torchrun (ours or the user's) started: it sets TORCHELASTIC_RUN_ID."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when its parent exits; exit now if the parent is
    already gone (we were re-parented before asking). -> False where prctl is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:
        print("lctrain: the launcher of this worker is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)
    return True


def die_with_parent_if_worker() -> None:
    if is_torchrun_worker():
        die_with_parent()
