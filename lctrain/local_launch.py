"""Start the local ranks of a multi-process job when the user did not run under torchrun or srun.

`lctrain train parallel.cp=2` (and the evals) re-run their own command in `n` processes through
torch.distributed.run, so a single-node CP/TP run needs no launcher of its own.

Signals: SIGUSR1, SIGTERM, SIGINT, SIGHUP, SIGQUIT sent to this process are forwarded to every
worker (torchrun's --signals-to-handle; a torch whose torchrun lacks it forwards only the last four,
and SIGUSR1 is then forwarded here), which then finish their step and save (see
lctrain.train.preemption); workers still running after SHUTDOWN_TIMEOUT_S get SIGKILL. Workers
die with this process even when it is killed with SIGKILL (lctrain.process_tree).

Errors: a worker that fails on a user error leaves its one line in torchrun's error file
(lctrain.errors); that line is printed here and the exit code is 2. Otherwise the first failure.
"""
from __future__ import annotations

import os
import signal
import sys

from lctrain.errors import USER_ERROR_EXIT, USER_ERROR_TAG

FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 600  # a worker stopping on a signal saves a checkpoint first


def torchrun_signal_options(shutdown_timeout_s: int) -> list[str]:
    """The torchrun options that forward SIGUSR1 too and give the workers time to save, as far as
    this torch's torchrun knows them (--signals-to-handle and --shutdown-timeout are recent)."""
    from torch.distributed.run import get_args_parser

    known = {s for action in get_args_parser()._actions for s in action.option_strings}
    options = []
    if "--signals-to-handle" in known:
        options += ["--signals-to-handle", FORWARDED_SIGNALS]
    if "--shutdown-timeout" in known:
        options += ["--shutdown-timeout", str(shutdown_timeout_s)]
    return options


def _forward_sigusr1_to_children() -> None:
    """For a torchrun without --signals-to-handle: pass SIGUSR1 on to the worker process groups."""
    me = os.getpid()

    def forward(signum, frame):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == me:
                    os.killpg(int(entry), signum)  # torchrun starts each worker in its own session
            except (OSError, ValueError, IndexError):
                continue

    signal.signal(signal.SIGUSR1, forward)


def self_launch(command: list[str], argv: list[str], n: int, use_cuda: bool) -> int:
    """Start `n` local ranks with torch.distributed.run, each running `lctrain <command> argv`; returns an exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    name = "lctrain " + " ".join(command)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(f"{name}: launching {n} local processes", flush=True)
    options = torchrun_signal_options(SHUTDOWN_TIMEOUT_S)
    if "--signals-to-handle" not in options:
        _forward_sigusr1_to_children()
    try:
        torchrun_main(["--standalone", f"--nproc_per_node={n}", *options, "-m", "lctrain.cli", *command, *argv])
    except ChildFailedError as err:
        return _report_failure(name, err)
    except SignalException as err:  # forwarded; the workers said what they did
        return 128 + int(err.sigval)
    except SystemExit as err:  # torchrun's argument errors
        return int(err.code or 0)
    return 0


def _report_failure(name: str, err) -> int:
    failures = err.failures
    for _, failure in sorted(failures.items()):
        if isinstance(failure.error_file_data, dict) and failure.error_file_data.get(USER_ERROR_TAG):
            print(failure.message, file=sys.stderr, flush=True)
            return USER_ERROR_EXIT
    stop_codes = {128 + int(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    codes = {f.exitcode for f in failures.values()}
    if codes <= stop_codes:  # stopped on a signal sent to the workers themselves; they said so
        return max(codes)
    rank, first = err.get_first_failure()
    print(f"{name}: worker {rank} failed (exit code {first.exitcode}): {first.message}", file=sys.stderr, flush=True)
    return 1
