#!/usr/bin/env bash
# The synthetic reproductions (`lctrain repro NAME`, recipes/repro/) on a machine of one or more GPUs:
# one queue per GPU, side by side (queue i on GPU i, CUDA_VISIBLE_DEVICES), each repro of a queue after
# the other, each under its own `timeout`. Run from the repository root on the GPU machine, carrying
# `.whl` (built here by `bash .ci/device/build_wheels.sh`):
#     bash .ci/device/repro.sh ["QUEUE for GPU 0"] ["QUEUE for GPU 1"] ...
# A queue is a space-separated list of recipe names ("" = an empty queue). More queues than GPUs share
# them (queue i on GPU i mod the GPU count): each repro's model is small and its step launch-bound, so
# repros side by side on one GPU take far less than one after the other (logs/gpu_use.csv records the
# GPU's use). Each recipe's header estimates its time on one H200 alone (~2-7.5 minutes); a call takes
# REPRO_CALL_MIN (8.5) for the queues plus the install and packing: give the device call its full 600 s.
# The five recipes fit two calls on one H200 (measured 2026-12-01, docs/results/h200_2026-12-01_s6):
#     bash .ci/device/repro.sh loglinear_mqar mqar_deltanet loglinear_position_loss   (464 s for all three)
#     bash .ci/device/repro.sh deltaformer_swap sniah_ordering                        (~430 s)
# On more GPUs the same queues spread over them.
# Time: REPRO_CALL_MIN (default 8.5): minutes the queues may take (install excluded). A repro's share is
# the queue's time left less REPRO_RESERVE_S (default 150) for each repro after it in the queue; it runs
# with --budget-minutes = min(REPRO_BUDGET_MIN (default 7.5), share - 1 minute) (it starts no training
# run that would end past it; the claim is then reported as not decided) under a `timeout` of its share
# (a repro killed there still leaves its report of the runs that finished); one with under 2 minutes
# left is not started. REPRO_ARGS: more arguments for every repro (e.g. "train.steps=400").
# Every log, JSON, PNG and Markdown report, each run's metrics.jsonl and eval output go to $RES
# (default /tmp/repro_results); $OUT gets them as one repro_results.tgz plus summary.md (the
# verdicts): two files, well under a device call's limit of 8. Unpack into docs/results/repro/
# (NAME.{json,png,md}; logs in logs/) and link from README.
# REPRO_NO_INSTALL=1 uses the lctrain already importable (a CPU rehearsal: REPRO_ARGS=--tiny).
set -u
QUEUES=("$@")  # queue i runs on GPU i; "" = an empty queue
[ $# -gt 0 ] || QUEUES=(loglinear_mqar mqar_deltanet loglinear_position_loss)
ALL="${QUEUES[*]}"  # every recipe name of every queue
BUDGET=${REPRO_BUDGET_MIN:-7.5}
CALL_MIN=${REPRO_CALL_MIN:-8.5}
RESERVE=${REPRO_RESERVE_S:-150}
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
NGPU=$(nvidia-smi -L 2> /dev/null | wc -l); [ "$NGPU" -gt 0 ] || NGPU=1
[ "${#QUEUES[@]}" -le "$NGPU" ] || echo "repro.sh: ${#QUEUES[@]} queues on $NGPU GPU(s): queue i runs on GPU i mod $NGPU, sharing it"
# GPU use while the queues run, every 5 s (whether sharing a GPU between queues paid: the small models'
# steps are launch-bound, so one process leaves most of the GPU idle)
(while :; do nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader; sleep 5; done \
  > "$RES/logs/gpu_use.csv" 2> /dev/null) &
SAMPLER=$!
cd /tmp  # run from outside the checkout so that the installed lctrain (not the source tree) is imported

queue() {  # queue Q GPU NAME...: each repro in turn on that GPU; one line per repro in $RES/logs/queue<Q>.txt
  local q=$1 gpu=$2; shift 2
  local left_n=$#
  for name in "$@"; do
    local t0=$(date +%s)
    left_n=$(( left_n - 1 ))
    local share=$(( deadline - t0 - RESERVE * left_n ))  # what is left, less a reserve for each repro after it
    local budget=$(python3 -c "print(round(min($BUDGET, $share / 60 - 1), 2))")
    if [ "$share" -lt 120 ]; then
      echo "$name: not started on GPU $gpu: ${share}s left for it" | tee -a "$RES/logs/queue$q.txt"; continue
    fi
    rm -rf "${RUNS:?}/$name"
    echo "=== GPU $gpu: $name start $(date +%T), budget $budget min, timeout ${share}s"
    CUDA_VISIBLE_DEVICES=$gpu timeout -k 20 "$share" python3 -m lctrain.cli repro "$R/recipes/repro/$name.yaml" \
      --runs "$RUNS/$name" --out "$RES" --budget-minutes "$budget" data.cache_dir="$CACHE" ${REPRO_ARGS:-} \
      > "$RES/logs/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - t0 )) s on GPU $gpu$([ $rc = 124 ] && echo ' (TIMEOUT: its report holds the runs that finished)')" \
      | tee -a "$RES/logs/queue$q.txt"
    sed -n "/^lctrain repro $name: The claim/,\$p" "$RES/logs/$name.log" | head -12
  done
}
start=$(date +%s)
deadline=$(( start + $(python3 -c "print(int(60 * $CALL_MIN))") ))
PIDS=()
for i in "${!QUEUES[@]}"; do
  queue "$i" "$(( i % NGPU ))" ${QUEUES[$i]} &
  PIDS+=($!)
done
wait "${PIDS[@]}"
kill "$SAMPLER" 2> /dev/null
echo "=== ${#QUEUES[@]} queues done after $(( $(date +%s) - start )) s"

# keep each run's metrics.jsonl and eval output (small) beside the reports
for name in $ALL; do
  [ -d "$RUNS/$name" ] || continue
  (cd "$RUNS" && find "$name" \( -name metrics.jsonl -o -name '*.train.log' -o -path '*/eval/*' -o -path '*/position_loss/*' \) -type f \
     -size -4M | tar cf - -T - | (mkdir -p "$RES/runs" && cd "$RES/runs" && tar xf -))
done
{
  echo "# Repro device call $(date -u +%F)"; echo; cat "$RES/gpu.txt"; echo
  cat "$RES"/logs/queue*.txt; echo
  for name in $ALL; do [ -f "$RES/$name.md" ] && { cat "$RES/$name.md"; echo; }; done
} > "$OUT/summary.md"
tar czf "$OUT/repro_results.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"
ls -la "$OUT"
