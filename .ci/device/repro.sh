#!/usr/bin/env bash
# The synthetic reproductions (`lctrain repro NAME`, recipes/repro/) on a 2-GPU machine (nvidia-h200-x2):
# two queues run side by side, the first on GPU 0, the second on GPU 1 (CUDA_VISIBLE_DEVICES), each
# repro of a queue after the other, each under its own `timeout`. Run from the repository root on the
# GPU machine, carrying `.whl` (built here by `bash .ci/device/build_wheels.sh`):
#     bash .ci/device/repro.sh ["QUEUE for GPU 0"] ["QUEUE for GPU 1"]
# A queue is a space-separated list of recipe names. The default is the first of two calls that cover
# all five recipes; each call should take ~8 minutes (estimates; the recipes say how they were made):
#     bash .ci/device/repro.sh mqar_deltanet sniah_ordering
#     bash .ci/device/repro.sh "loglinear_mqar loglinear_position_loss" deltaformer_swap
# Env: REPRO_BUDGET_MIN (default 4): each repro's --budget-minutes (it starts no training run that
# would end past it; the claim is then reported as not decided), its timeout is that plus 2 minutes
# (kernel compiles, the last eval); REPRO_ARGS: more arguments for every repro (e.g. "train.steps=400").
# Every log, JSON, PNG and Markdown report, each run's metrics.jsonl and eval output go to $RES
# (default /tmp/repro_results); $OUT gets them as one repro_results.tgz plus summary.md (the
# verdicts). Unpack into docs/results/repro/ (NAME.{json,png,md}; logs in logs/) and link from README.
# REPRO_NO_INSTALL=1 uses the lctrain already importable (a CPU rehearsal: REPRO_ARGS=--tiny).
set -u
Q0="${1:-mqar_deltanet}"
Q1="${2:-sniah_ordering}"
BUDGET=${REPRO_BUDGET_MIN:-4}
LIMIT=$(python3 -c "print(int(60 * $BUDGET + 120))")
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=$PWD
OUT=${OUT:-/tmp/out}; RES=${RES:-/tmp/repro_results}; RUNS=${RUNS:-/tmp/runs/repro}; CACHE=${CACHE:-/tmp/lctrain_cache}
rm -rf "$RES"  # a warm machine keeps /tmp: results and runs of an earlier call must not mix in (runs would resume)
mkdir -p "$OUT" "$RES/logs" /tmp/tcache "$RUNS"
[ "${REPRO_NO_INSTALL:-0}" = 1 ] || {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
} > "$RES/logs/install.log" 2>&1 || { tail -20 "$RES/logs/install.log"; exit 1; }
[ "${REPRO_NO_INSTALL:-0}" = 1 ] || export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$RES/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())" \
  | tee -a "$RES/gpu.txt"
cd /tmp  # run from outside the checkout so that the installed lctrain (not the source tree) is imported

queue() {  # queue GPU NAME...: each repro in turn on that GPU; one line per repro in $RES/logs/queue<GPU>.txt
  local gpu=$1; shift
  for name in "$@"; do
    local t0=$(date +%s)
    rm -rf "${RUNS:?}/$name"
    echo "=== GPU $gpu: $name start $(date +%T), budget $BUDGET min, timeout ${LIMIT}s"
    CUDA_VISIBLE_DEVICES=$gpu timeout -k 20 "$LIMIT" python3 -m lctrain.cli repro "$R/recipes/repro/$name.yaml" \
      --runs "$RUNS/$name" --out "$RES" --budget-minutes "$BUDGET" data.cache_dir="$CACHE" ${REPRO_ARGS:-} \
      > "$RES/logs/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - t0 )) s on GPU $gpu$([ $rc = 124 ] && echo ' (TIMEOUT: its report holds the runs that finished)')" \
      | tee -a "$RES/logs/queue$gpu.txt"
    sed -n "/^lctrain repro $name: The claim/,\$p" "$RES/logs/$name.log" | head -12
  done
}
start=$(date +%s)
queue 0 $Q0 &
queue 1 $Q1 &
wait
echo "=== both queues done after $(( $(date +%s) - start )) s"

# keep each run's metrics.jsonl and eval output (small) beside the reports
for name in $Q0 $Q1; do
  [ -d "$RUNS/$name" ] || continue
  (cd "$RUNS" && find "$name" \( -name metrics.jsonl -o -path '*/eval/*' -o -path '*/position_loss/*' \) -type f \
     -size -4M | tar cf - -T - | (mkdir -p "$RES/runs" && cd "$RES/runs" && tar xf -))
done
{
  echo "# Repro device call $(date -u +%F)"; echo; cat "$RES/gpu.txt"; echo
  cat "$RES"/logs/queue*.txt; echo
  for name in $Q0 $Q1; do [ -f "$RES/$name.md" ] && { cat "$RES/$name.md"; echo; }; done
} > "$OUT/summary.md"
tar czf "$OUT/repro_results.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"
ls -la "$OUT"
