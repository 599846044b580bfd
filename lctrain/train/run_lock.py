"""One run per out_dir: an exclusive lock on `out_dir/.lock`, held for the whole run.

Two runs in one out_dir race into the same checkpoints and metrics. The lock is a POSIX advisory
lock (fcntl.flock) on a file that records the holder's pid and host; the kernel drops it when the
holder exits, however it exits (kill -9 included), so there is never a stale lock to clean up.

Who holds it: the `lctrain train` process that launches local workers holds it for them (they see
LCTRAIN_LOCK_HOLDER = their parent's pid and take nothing); otherwise global rank 0 takes it.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from lctrain.errors import UserError

LOCK_FILE = ".lock"
HOLDER_ENV = "LCTRAIN_LOCK_HOLDER"


class OutDirInUse(UserError):
    """Another live run holds the out_dir."""


class OutDirLock:
    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(os.path.expanduser(str(out_dir)))
        self.path = self.out_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "OutDirLock":
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"train.out_dir {str(self.out_dir)!r} cannot be used ({err.strerror}); choose a writable "
                            "directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutDirInUse(
                f"train.out_dir {str(self.out_dir)!r} is in use by another lctrain run ({holder}); "
                "wait for it to finish or stop it, or choose another train.out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd,
                  f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
                  0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_for_this_process(out_dir: str | os.PathLike) -> OutDirLock | None:
    """The lock this process must hold for the run, acquired; None when another process holds it
    for us (our launcher) or another rank takes it (only global rank 0 does)."""
    if os.environ.get(HOLDER_ENV) == str(os.getppid()):
        return None
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return OutDirLock(out_dir).acquire()
