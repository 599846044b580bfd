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


def _slow_prefix_scan(seconds: float):
    """Streaming's prefix scan, stretched between picking the prefix and registering it, as a busy CI box
    (or a temp dir full of stale `<n>_*_filelock` files, which the scan walks past one by one) stretches
    it, so that the race shows on every run and not only on an unlucky one. Wraps a private name: if
    streaming renames it or its arguments, this fails loudly instead of silently testing nothing."""
    from streaming.base.constant import SHM_TO_CLEAN
    from streaming.base.shared import prefix

    scan = prefix._check_and_find_retrying

    def slow(*args, **kwargs):
        found = scan(*args, **kwargs)
        if kwargs["shm_name"] == SHM_TO_CLEAN[-1]:  # the last of its scans: the prefix is chosen
            time.sleep(seconds)
        return found

    return slow


def _build_rounds(path, start, ready, rounds) -> list[tuple]:
    """One job's part: build TokenSamples `rounds` times, every round together with the other job (all
    leave `start` at once); keep them all alive until everyone is done (a process that exits frees its
    prefixes for reuse). Outcomes: ("ok", prefix, finish time) or ("error", traceback, time)."""
    from lctrain.data.token_dataset import TokenSamples

    kept, outcomes = [], []
    ready.touch()
    for _ in range(rounds):
        try:
            start.wait(timeout=30)
            kept.append(TokenSamples(local=path, remote=None, shuffle=False, batch_size=1, cp_rank=0, cp_size=1))
            outcomes.append(("ok", kept[-1]._shm_prefix_int, time.time()))
        except threading.BrokenBarrierError:
            break  # another job failed and said so
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


def _two_rank_job(rank, world_size, path, start, ready_dir, rounds):
    from streaming.base.shared import prefix

    prefix._check_and_find_retrying = _slow_prefix_scan(0.05)
    return _build_rounds(path, start, ready_dir / f"rank{rank}", rounds)


def test_jobs_building_datasets_at_once_get_distinct_prefixes(tmp_path, monkeypatch):
    """A 2-rank gloo job (two spawned processes; local rank 0 leads) and a single-process job (this
    process, as a pytest-xdist worker is one) build datasets side by side, 3 times, while a third
    party at first holds the machine's construction lock. Nobody may finish a construction before that
    release (the lock covers a single process and every rank of a world); afterwards every
    construction succeeds (no deadlock, no FileExistsError) and each job's live datasets have shared
    memory of their own. Without the lock, the first round already fails."""
    from dist_utils import run_world
    from streaming.base.shared import prefix

    from lctrain.data.streaming_lock import lock_path

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(prefix, "_check_and_find_retrying", _slow_prefix_scan(0.05))
    rounds, path, ready = 3, _tiny_dataset(tmp_path), tmp_path / "ready"
    ready.mkdir()
    start = mp.get_context("spawn").Barrier(3)
    fd = os.open(lock_path(), os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a separate open file: it excludes this process's own job too
    released, single, finished = [], [], threading.Event()

    def release_once_all_wait():
        while len(list(ready.iterdir())) < 3 and not finished.is_set():
            time.sleep(0.05)
        time.sleep(0.5)  # all three are past `start` and inside the construction by now
        released.append(time.time())
        os.close(fd)

    threads = [threading.Thread(target=release_once_all_wait),
               threading.Thread(target=lambda: single.extend(_build_rounds(path, start, ready / "single", rounds)))]
    for t in threads:
        t.start()
    try:
        res = run_world(_two_rank_job, 2, path, start, ready, rounds, timeout=120) + [single]
    finally:
        finished.set()
        start.abort()  # if run_world failed, the single job stops waiting for it
        for t in threads:
            t.join()
    errors = [text for outcomes in res for status, text, _ in outcomes if status == "error"]
    assert not errors, f"{len(errors)} construction(s) failed; first:\n{errors[0]}"
    assert all(len(outcomes) == rounds for outcomes in res), res
    early = [(job, round(outcomes[0][2] - released[0], 3)) for job, outcomes in zip(("rank 0", "rank 1", "single"), res)
             if outcomes[0][2] <= released[0]]
    assert not early, f"(job, seconds after the release): {early}; they did not wait for the held lock"
    world, single_prefixes = [[prefix for _, prefix, _ in outcomes] for outcomes in (res[0], res[2])]
    assert [prefix for _, prefix, _ in res[1]] == world  # the ranks of one job share each registration
    assert len(set(world + single_prefixes)) == 2 * rounds, (world, single_prefixes)


def test_single_process_holds_the_lock_for_the_block_and_releases_it_on_an_exception(tmp_path, monkeypatch):
    import pytest

    from lctrain.data import streaming_lock
    from lctrain.data.loader import DataError

    path = tmp_path / "construction.lock"
    monkeypatch.setattr(streaming_lock, "lock_path", lambda: str(path))  # not the machine's: no other process
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="boom"):
        with streaming_lock.streaming_construction_lock():
            other = os.open(path, os.O_RDONLY)  # a second descriptor conflicts with the first, as another process
            assert not streaming_lock._try_lock(other)
            raise ValueError("boom")
    assert streaming_lock._try_lock(other)  # released although the block raised
    os.close(other)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DataError, match="init_process_group"):
        with streaming_lock.streaming_construction_lock():
            pass
