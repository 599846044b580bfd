"""Start the local ranks of a multi-process job when the user did not run under torchrun or srun.

`lctrain train parallel.cp=2` (and the evals) re-run their own command in `n` processes through
torch.distributed.run, so a single-node CP/TP run needs no launcher of its own.
"""
from __future__ import annotations

import os
import sys


def self_launch(command: list[str], argv: list[str], n: int, use_cuda: bool) -> int:
    """Start `n` local ranks with torch.distributed.run, each running `lctrain <command> argv`; returns an exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    name = "lctrain " + " ".join(command)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(f"{name}: launching {n} local processes", flush=True)
    try:
        torchrun_main(["--standalone", f"--nproc_per_node={n}", "-m", "lctrain.cli", *command, *argv])
    except ChildFailedError as err:
        print(f"{name}: a worker failed: {err.get_first_failure()[1].message}", file=sys.stderr)
        return 1
    except SystemExit as err:  # torchrun's argument errors
        return int(err.code or 0)
    return 0
