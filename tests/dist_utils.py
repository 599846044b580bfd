"""Run a function in N CPU processes (gloo) and collect their results; fail fast, never hang.

    results = run_world(fn, world_size, *args, timeout=120)

Each process gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
joins a gloo world (unless ``init_process_group=False``: then ``fn`` must do it, e.g. via
``init_mesh``), calls ``fn(rank, world_size, *args)`` and sends back its (picklable) return value.
``fn`` must be defined at module level (processes are spawned, so it is imported by name).
An exception in any process is re-raised here with that process's traceback and the other processes
are killed at once; the whole run is bounded by ``timeout`` seconds (collectives time out too).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta


class WorkerError(RuntimeError):
    """A process of the world raised; the message holds its rank and traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, init_pg, timeout):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        if init_pg:
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout))
        try:
            out = fn(rank, world_size, *args)
        finally:
            try:
                from lctrain.parallel.mesh import destroy_mesh
                destroy_mesh()
            except Exception:
                pass
            if dist.is_initialized():
                dist.destroy_process_group()
        # plain pickle: tensors travel by value, not as shared memory that dies with this process
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None  # the traceback already went to the parent


_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _first_failure(errors: dict, results, world_size: int) -> str:
    """One rank failing makes its peers fail in their next collective ("connection closed by peer"),
    and those tracebacks may arrive first: collect for a moment, then put the likely cause first."""
    end = time.monotonic() + 2.0
    while len(errors) < world_size and time.monotonic() < end:
        try:
            rank, status, value = results.get(timeout=0.2)
        except queue.Empty:
            continue
        if status == "error":
            errors[rank] = value
    order = sorted(errors, key=lambda r: (any(m in errors[r] for m in _SECONDARY), r))
    return "\n".join(f"rank {r} of {world_size} failed:\n{errors[r]}" for r in order)


def run_world(fn, world_size: int, *args, timeout: float = 180.0, init_process_group: bool = True):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; list of results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, fn, args, results, init_process_group, timeout))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    # give its queued traceback a moment to arrive before reporting the bare exit code
                    try:
                        rank, status, value = results.get(timeout=2.0)
                    except queue.Empty:
                        raise WorkerError(f"rank {dead[0][0]} died with exit code {dead[0][1]} "
                                          "and no traceback") from None
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"run_world({getattr(fn, '__name__', fn)}, {world_size}) exceeded {timeout}s; "
                                       f"finished ranks: {sorted(out)}") from None
                else:
                    continue
            if status == "error":
                raise WorkerError(_first_failure({rank: value}, results, world_size))
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            if p.is_alive() and len(out) < world_size:
                p.kill()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]
