"""Test set-up shared by every test.

CPU runs (CI) execute Triton kernels through the interpreter, which must be switched on before
triton is first imported, so this happens in pytest_configure, before any test module loads torch.
Runs that select the `gpu` marker compile the kernels for the real device instead.

Shared helpers live beside this file as plain modules, imported by name from any test module:
`dist_utils` (run a function in N gloo processes) and `kernel_cases` (call an op, collect its
outputs and gradients). pytest puts this folder (tests/, which has no __init__.py) on sys.path
when it loads this conftest.py (rootdir-relative "prepend" import mode, pytest's default), so no
test edits sys.path itself.
"""
import os


def pytest_configure(config):
    markexpr = config.getoption("markexpr", "") or ""
    gpu_run = "gpu" in markexpr and "not gpu" not in markexpr
    if not gpu_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not gpu_run else os.environ.get("DS_ACCELERATOR", "cuda"))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    # training uses OMP_NUM_THREADS or every core per rank, fixed for the run (deterministic); with
    # pytest-xdist's workers sharing the CI box's 2 cores, one thread each avoids OpenMP waiting on
    # descheduled threads (which made steps up to ~20x slower)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
