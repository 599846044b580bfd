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

import pytest


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


# A CUDA fault (an illegal memory access, a device-side assert) is sticky: every later CUDA call in the same
# process fails, so one faulting test made every test after it in its pytest-xdist worker fail too (GPU logs of
# 2026-11-30). After a test whose failure is such a fault, the process exits once its report is written: xdist
# reports the test and starts a fresh worker for the rest; without xdist the run stops after it (session.shouldstop).
STICKY_CUDA_ERRORS = ("illegal memory access", "CUDA error: an illegal", "device-side assert",
                      "unspecified launch failure", "Triton Error [CUDA]")


def is_sticky_cuda_error(text: str) -> bool:
    return any(s in text for s in STICKY_CUDA_ERRORS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    err = call.excinfo.value if call.excinfo is not None else None
    # an error CUDA raised in this process, not an assertion that quotes one (e.g. from a spawned worker)
    sticky = (report.when == "call" and err is not None and not isinstance(err, AssertionError)
              and is_sticky_cuda_error(str(err)))
    if sticky and not hasattr(item.config, "workerinput"):  # a plain run: stop after this test, with the summary
        item.session.shouldstop = f"{item.nodeid} left a sticky CUDA error (every later CUDA call would fail)"
    report.sticky_cuda_error = sticky and hasattr(item.config, "workerinput")


@pytest.hookimpl(trylast=True)  # after xdist has sent the report and the terminal has shown it
def pytest_runtest_logreport(report):
    # only in the xdist worker that ran the test (the controller sees the same report, attribute included)
    if getattr(report, "sticky_cuda_error", False) and os.environ.get("PYTEST_XDIST_WORKER"):
        import sys
        sys.stderr.write(f"\nconftest: {report.nodeid} left a sticky CUDA error; ending this test process so that "
                         "later tests run in a fresh one\n")
        sys.stderr.flush()
        os._exit(3)
