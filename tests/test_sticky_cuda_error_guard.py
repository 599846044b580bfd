"""tests/conftest.py ends a test process after a test failed with a sticky CUDA error, so that the tests after it
run in a fresh process (under pytest-xdist) instead of all failing on the poisoned CUDA context. Checked with a
stand-in: a test that raises the error text of a CUDA fault and poisons a module-level flag, then tests that fail
if they run in the same process."""
import shutil
import subprocess
import sys
from pathlib import Path


def test_a_sticky_cuda_error_ends_the_worker_and_later_tests_run_in_a_fresh_one(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_fault.py").write_text(
        "POISONED = []\n"
        "def test_0_faults():\n"
        "    POISONED.append(1)\n"
        "    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
        + "".join(f"def test_{i}_after():\n    assert not POISONED\n" for i in range(1, 4)))
    def pytest(*args):
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "--rootdir",
                              str(tmp_path), str(tmp_path / "test_fault.py")],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        return run.stdout + run.stderr

    out = pytest("-n", "1")  # xdist: the worker ends after the fault, a fresh one runs the other three
    assert "test_0_faults left a sticky CUDA error" in out and "3 passed" in out, out[-2000:]
    out = pytest("-p", "no:xdist")  # a plain run stops after the fault, with its summary
    assert "1 failed in" in out and "sticky CUDA error" in out and "passed" not in out, out[-2000:]
