#!/usr/bin/env bash
# `pytest -m gpu` of the given test files on the GPU machine, each file's whole output kept. Run from the
# repository root, carrying `.whl`:
#     bash .ci/device/pytest_gpu.sh tests/test_loglinear_kernels.py tests/test_kernels_strong_decay.py
# pytest runs from /tmp against the installed lctrain: in the checkout `lctrain.kernels` cannot be imported
# (the package is installed from kernels/), so a pytest started there stops at collection (2026-12-01).
# PYTEST_GPU_S (default 240): the time limit of each file; PYTEST_ARGS: more pytest arguments, split as the shell
# splits words, quotes kept (PYTEST_ARGS='-k "block_totals or long_and_wide" -s');
# PYTEST_NO_INSTALL=1: /tmp/site is installed already. Logs: $OUT/pytest_gpu_<file name>.log, one line per
# file on the console (its summary and exit status).
set -u
[ $# -gt 0 ] || { echo "usage: bash .ci/device/pytest_gpu.sh tests/FILE.py ..."; exit 2; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/tcache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/tcache
for f in "$@"; do [ -f "$R/$f" ] || { echo "pytest_gpu.sh: no test file $f (give paths from the repository root)"; exit 2; }; done
if [ "${PYTEST_NO_INSTALL:-0}" != 1 ]; then
  { python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl &&
    python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-compile --target /tmp/site .; } \
    > "$OUT/pytest_gpu_install.log" 2>&1 || { tail -20 "$OUT/pytest_gpu_install.log"; exit 1; }
fi
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
eval "extra=(${PYTEST_ARGS:-})"   # (an unquoted expansion split -k "a or b" into words: one call lost its tests)
cd /tmp
status=0
for f in "$@"; do
  log="$OUT/pytest_gpu_$(basename "$f" .py).log"; t=$SECONDS
  timeout -k 5 "${PYTEST_GPU_S:-240}" python3 -m pytest -m gpu -v --tb=short -rfE -p no:cacheprovider \
    -c "$R/pyproject.toml" --rootdir "$R" "${extra[@]}" "$R/$f" > "$log" 2>&1
  rc=$?; [ $rc = 0 ] || status=$rc
  echo "[rc $rc after $((SECONDS - t)) s]" >> "$log"
  echo "$f: $(grep -E '^=+ .*(passed|failed|error|skipped|deselected)' "$log" | tail -1) rc $rc"
done
exit $status
