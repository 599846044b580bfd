"""One mosaicml-streaming dataset construction at a time per machine.

Why: a StreamingDataset names its shared memory `<prefix>_locals`, `<prefix>_barrier`, ... after a
prefix integer that `streaming.base.shared.prefix.get_shm_prefix` picks by scanning for the first
number that has neither shared memory nor `<prefix>_barrier_filelock` / `_cache_filelock` files in
the temp dir, and registers only afterwards, when the local leader creates `<prefix>_locals`. Two
processes of one machine that build datasets at the same moment (pytest-xdist workers, two jobs on
one node, a Slurm job beside a test) can pick the same prefix; the later one then fails with
`FileExistsError: '/<prefix>_locals'`, or a non-leader rank finds another job's registration.

Streaming (0.13) offers no fix for this: StreamingDataset takes no prefix argument and holds no
lock around the scan, and `streaming.base.util.clean_stale_shared_memory()` is no remedy: it unlinks
the shared memory of every prefix from 0 upwards without asking whether its owner is still running
(on a shared machine it would pull the memory from under other live datasets), and it leaves the
window between scan and registration open. So every construction in lctrain goes through
`streaming_construction_lock()`, which holds an exclusive `fcntl.flock` on LOCK_PATH while the
dataset registers its prefix. The lock file lives in /dev/shm, where Python's shared memory lives on
Linux, so the lock has exactly the reach of the namespace it protects (a container or a Slurm job
with a private /dev/shm has its own lock, and TMPDIR does not matter); elsewhere it falls back to the
temp dir. The kernel drops a flock when its process dies, so a killed run never leaves the lock held.

Under torch.distributed only each machine's local leader (streaming's notion: RANK % LOCAL_WORLD_SIZE
== 0) takes the lock, and every rank goes through the same collectives: the leaders try the lock
without blocking, all ranks compare notes with one all-gather, and unless every leader holds its
lock the holders let go and all retry after a short random pause. So no rank ever blocks on a lock
inside a collective: two multi-node jobs that share two machines cannot each hold one machine's lock
while waiting for the other's. After the construction a barrier makes sure every rank has attached
before any leader lets the next construction scan. On an exception the lock is released and no
further collective is entered (the other ranks fail in streaming's own barriers, as before).

Stale `<n>_barrier_filelock` / `<n>_cache_filelock` files in the temp dir (streaming creates them on
first iteration and never deletes them) are left alone: the scan only skips those numbers, so they
cannot make a run fail, and deleting a lock file that another process may be about to open would
break that lock's mutual exclusion.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_NAME = "lctrain-streaming-construction.lock"


def lock_path() -> str:
    """/dev/shm/lctrain-streaming-construction.lock on Linux, else the same name in the temp dir."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(folder, LOCK_NAME)


def _open_lock_file(path: str) -> int:
    """A read-only descriptor (flock needs no write access, so another user's lock file serves too);
    create the file only if it is missing (protected_regular refuses O_CREAT on a file that another
    user owns in a sticky directory), readable by everyone whatever the umask."""
    try:
        for _ in range(3):
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                pass
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue  # someone created it in between: open theirs
            os.fchmod(fd, 0o644)
            return fd
        return os.open(path, os.O_RDONLY)
    except PermissionError:
        from lctrain.data.loader import DataError

        raise DataError(f"cannot open the dataset construction lock {path}: make it readable for every user "
                        f"(chmod a+r {path}) or remove it") from None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def _is_local_leader() -> bool:
    """Streaming's own test (streaming.base.world.World), from RANK and LOCAL_WORLD_SIZE."""
    from streaming.base.world import World

    return World.detect().is_local_leader


def _lock_on_every_machine(fd: int | None, path: str) -> None:
    """Return once every local leader holds its machine's lock (fd is None on the other ranks)."""
    import torch.distributed as dist

    pause, waited, warned = random.Random(), 0.0, False
    while True:
        mine = fd is None or _try_lock(fd)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if all(everyone):
            return
        if mine and fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if waited > 30 and not warned and fd is not None:
            log.warning("waiting for %s: another process on this machine is building a streaming dataset", path)
            warned = True
        delay = pause.uniform(0.01, 0.1)
        time.sleep(delay)
        waited += delay


@contextmanager
def streaming_construction_lock() -> Iterator[None]:
    """Build StreamingDatasets inside this (TokenSamples does): one construction at a time per machine.

    A single process (torch.distributed not initialized) simply holds the lock for the block; under
    torch.distributed every rank must enter the block (it holds collectives)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from lctrain.data.loader import DataError

        raise DataError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but torch.distributed is not initialized: call "
                        "torch.distributed.init_process_group before building the dataset (its construction "
                        "lock synchronises the ranks of a machine)")
    path = lock_path()
    fd = _open_lock_file(path) if _is_local_leader() else None
    try:
        if distributed:
            _lock_on_every_machine(fd, path)
        elif fd is not None and not _try_lock(fd):
            log.info("waiting for %s: another process on this machine is building a streaming dataset", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
        if distributed:
            dist.barrier()  # every rank has attached to the new prefix before the next job scans
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock
