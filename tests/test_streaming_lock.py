"""Datasets built at the same moment by several processes of one machine (lctrain.data.streaming_lock).

mosaicml-streaming picks a dataset's shared-memory prefix by scanning for a free one and registers it
only afterwards; without the construction lock, processes that scan at the same moment claim the same
prefix and all but one fail with FileExistsError: '/<prefix>_locals' (the CI flake of pytest-xdist
workers building datasets side by side).
"""
from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import threading
import time
import traceback

import numpy as np


def _tiny_dataset(tmp_path) -> str:
    from lctrain.data.mds import write_mds

    rows = np.random.default_rng(0).integers(0, 259, size=(4, 9))
    return str(write_mds(tmp_path / "ds", list(rows), sample_len=9, dtype=np.uint16))


def _slow_prefix_scan(seconds: float) -> None:
    """Stretch streaming's scan-to-registration window, as a busy CI box (or a temp dir full of stale
    `<n>_*_filelock` files, which the scan walks past one by one) does, so that the race shows on
    every run and not only on an unlucky one. Patches a private name: if streaming renames it, this
    fails loudly instead of silently testing nothing."""
    from streaming.base.shared import prefix

    scan = prefix._check_and_find_retrying

    def slow(*args, **kwargs):
        found = scan(*args, **kwargs)
        time.sleep(seconds)
        return found

    prefix._check_and_find_retrying = slow


def _job(rank, world_size, path, start, ready_dir, rounds):
    """Processes 0 and 1 are one 2-rank gloo job (local rank 0 leads), process 2 a single-process job (as
    a pytest-xdist worker is). Each builds TokenSamples `rounds` times, every round together with the
    other job (all leave `start` at once), and keeps them all alive until everyone is done (a process
    that exits frees its prefixes for reuse)."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    if rank < 2:  # run_world set RANK, LOCAL_RANK, MASTER_ADDR/PORT for a world of 3: make it a world of 2
        os.environ.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    else:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    from lctrain.data.token_dataset import TokenSamples

    _slow_prefix_scan(0.03)
    kept, outcomes = [], []
    for _ in range(rounds):
        (ready_dir / f"process{rank}").touch()
        try:
            start.wait(timeout=30)
            kept.append(TokenSamples(local=path, remote=None, shuffle=False, batch_size=1, cp_rank=0, cp_size=1))
            outcomes.append(("ok", kept[-1]._shm_prefix_int, time.time()))
        except threading.BrokenBarrierError:
            break  # another process failed and said so
        except Exception:  # noqa: BLE001 - reported to the test, which names it
            outcomes.append(("error", traceback.format_exc(limit=3), time.time()))
            start.abort()  # the others stop at once instead of waiting for a barrier or a collective
            break
    else:
        try:
            start.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
    return outcomes


def test_jobs_building_datasets_at_once_get_distinct_prefixes(tmp_path):
    """A 2-rank job and a single-process job build datasets side by side, 3 times, while another
    process at first holds the machine's construction lock: nobody may finish a construction before
    that release (the lock covers a single process and every rank of a world), afterwards every
    construction succeeds (no deadlock, no FileExistsError), and each job's live datasets have
    shared memory of their own. Without the lock, the first round already fails."""
    from dist_utils import run_world

    from lctrain.data.streaming_lock import lock_path

    rounds, path, ready = 3, _tiny_dataset(tmp_path), tmp_path / "ready"
    ready.mkdir()
    start = mp.get_context("spawn").Barrier(3)
    fd = os.open(lock_path(), os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    released, finished = [], threading.Event()

    def release_once_all_wait():
        while len(list(ready.iterdir())) < 3 and not finished.is_set():
            time.sleep(0.05)
        time.sleep(0.5)  # all three are past `start` and inside the construction by now
        released.append(time.time())
        os.close(fd)

    releaser = threading.Thread(target=release_once_all_wait)
    releaser.start()
    try:
        res = run_world(_job, 3, path, start, ready, rounds, init_process_group=False, timeout=120)
    finally:
        finished.set()
        releaser.join()
    errors = [text for outcomes in res for status, text, _ in outcomes if status == "error"]
    assert not errors, f"{len(errors)} construction(s) failed; first:\n{errors[0]}"
    assert all(len(outcomes) == rounds for outcomes in res), res
    early = [(p, round(outcomes[0][2] - released[0], 3)) for p, outcomes in enumerate(res)
             if outcomes[0][2] <= released[0]]
    assert not early, f"process, seconds after the release: {early}; they did not wait for the held lock"
    world, single = [[prefix for _, prefix, _ in outcomes] for outcomes in (res[0], res[2])]
    assert [prefix for _, prefix, _ in res[1]] == world  # the ranks of one job share each registration
    assert len(set(world + single)) == 2 * rounds, (world, single)
