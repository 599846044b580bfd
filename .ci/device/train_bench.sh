#!/usr/bin/env bash
# Device calls for the 1.3B GDN-H1 training targets (issue 14), sized for ~8-minute calls on 2 x H200.
# Run from the repository root on the GPU machine, carrying `.whl` (built here by
# `bash .ci/device/build_wheels.sh`):
#     bash .ci/device/train_bench.sh STEP [STEP ...]
# Steps (each under its own timeout; each keeps its FULL output in $RES/<name>.log, JSONs and profiles
# beside; the console, and $OUT/summary.txt, show only their summaries). A device call brings back at most
# 8 files, so after every step $RES is packed into $OUT/train_bench_results.tgz (logs, JSONs, kernel
# tables) and $OUT/train_bench_traces.tgz (the chrome traces, left out when over 15 MiB): a call cut at
# its limit still returns the steps before, and $OUT/running_step.log holds the cut step's output.
# Typical times below; each step's timeout is larger, so give a call's steps ~8 minutes of typical time.
#   targets        issue 14's targets in one call: the block kernels' GPU tests and the 32K bench with none
#                  (MFU) on GPU 0 beside the one-GPU length search (512K .. 1M) on GPU 1, then the
#                  131K cp=2 run (20 steps)                                                      ~7.5 min
#   quick          32K on one GPU: GPU tests of the short conv kernel and model.compile, then the bench
#                  with selective:S (model.compile=false) and with none + model.compile=true (the likely
#                  fastest), each + --profile (top kernels, time by kind, chrome trace in profile_<tag>/) ~4 min
#   compare        the other two corners: selective:S + compile, none without compile (+ --profile) ~4 min
#   reach          longest context of one training step on ONE GPU (256K .. 1M)                 ~4 min
#   reach_cp2      the same with parallel.cp=2 on TWO GPUs (1M .. 2M; REACH_CP2_LENGTHS, REACH_CP2_S) ~4 min
#   train131k_cp2  `lctrain train` 20 real steps at 131K with parallel.cp=2 (loss, tokens/s)     ~3.5 min
#   tests          the GPU tests of the long-context memory savers and the fused ops             ~2 min
#   actmem         activations each block kind keeps per token (H1, H2)                          ~1 min
#   sanity         a 10-step `lctrain train` of a small model                                    ~1 min
#   bench_full     32K bench with full checkpointing                                              ~1.5 min
#   train131k      `lctrain train` 20 real steps at 131K on ONE GPU                               ~5 min
#   pptests        pipeline parallelism pp=2 vs one GPU (2 GPUs)                                 ~9 min
#   layouts        `lctrain bench layouts` of gdn_h1_1p3b at 64K, tp=1 (one GPU, the reference for held
#                  memory) / tp=2 / cp=2 / pp=2 side by side (2 GPUs; LAYOUTS="pp=2" for one; LAYOUTS_LEN
#                  the length, default 65536; LAYOUTS_S the step's limit, no layout starts in its last
#                  150 s; ~2 min per layout, most of it start-up, first-step compiles, the final save) ~8 min
# (maxlen / maxlen_cp2: the earlier names of reach / reach_cp2.)
# Suggested calls: `targets` (first), `reach_cp2 quick` (second), `compare tests` (third).
# Unpack train_bench_results.tgz into docs/results/<date>_train_bench/ and record the JSONs with
# `lctrain bench record docs/results/<...>/*.json`.
set -u
STEPS="${*:-quick train131k_cp2}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=$PWD
OUT=${OUT:-/tmp/out}; RES=${RES:-/tmp/train_bench_results}; mkdir -p "$OUT" "$RES" /tmp/tcache
exec > >(tee -a "$OUT/summary.txt") 2>&1
pack() {  # everything but the traces in one archive, the traces in another when small enough
  tar -czf "$OUT/train_bench_results.tgz" -C "$(dirname "$RES")" --exclude='*.json.gz' "$(basename "$RES")"
  local traces; traces=$(cd "$(dirname "$RES")" && ls "$(basename "$RES")"/*/*.json.gz 2>/dev/null)
  [ -n "$traces" ] && (cd "$(dirname "$RES")" && tar -czf "$OUT/train_bench_traces.tgz" $traces)
  if [ -f "$OUT/train_bench_traces.tgz" ] && [ "$(stat -c %s "$OUT/train_bench_traces.tgz")" -gt 15728640 ]; then
    rm -f "$OUT/train_bench_traces.tgz"; echo "(chrome traces over 15 MiB: left out)"
  fi
}
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
} > "$RES/install.log" 2>&1 || { tail -20 "$RES/install.log"; exit 1; }
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
LC="python3 -m lctrain.cli"
H1="$R/recipes/gdn_h1_1p3b.yaml"
cd /tmp
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$RES/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())" >> "$RES/gpu.txt"
cat "$RES/gpu.txt"

# run NAME SECONDS PATTERN CMD...: CMD's whole output to $RES/NAME.log, its exit status appended; the
# console shows the lines matching PATTERN (grep -E) and the last 3 lines
run() {
  local name=$1 limit=$2 pattern=$3; shift 3
  local t0=$SECONDS
  # also to $OUT/running_step.log (RUNLOG): if the device call is cut mid-step, its output still comes back
  local runlog=${RUNLOG:-$OUT/running_step.log}
  timeout -k 15 "$limit" "$@" 2>&1 | tee "$RES/$name.log" > "$runlog"
  local rc=${PIPESTATUS[0]}
  rm -f "$runlog"  # finished: its whole log goes into the archive
  echo "[exit status $rc after $((SECONDS - t0)) s; 124/137 = cut at ${limit} s]" >> "$RES/$name.log"
  echo "--- $name: rc $rc, $((SECONDS - t0)) s"
  { grep -E "$pattern" "$RES/$name.log" | grep -vE "^step [0-9]+/[0-9]+:|^warm-up"; tail -3 "$RES/$name.log"; } | awk '!seen[$0]++' | cut -c1-400
}
SUMMARY="tokens/s|time split|profile of one step|seq_len [0-9]+:|longest context|Error|error:|Traceback|out of memory"

bench32k() {  # bench32k TAG LIMIT [overrides...]
  local tag=$1 limit=$2; shift 2
  run "bench_h1_32k_$tag" "$limit" "$SUMMARY|^ +[0-9.]+ +[0-9.]+ +[0-9]+  " \
    $LC bench train "$H1" "$@" --steps 3 --warmup 2 --profile "$RES/profile_$tag" --json "$RES/bench_h1_32k_$tag.json"
}

for s in $STEPS; do
  echo "=== $s $(date +%T)"
  case $s in
    targets) # one GPU each, side by side: the 32K bench with none (MFU) on GPU 0, the one-GPU length search
             # (512K, 786K, 1M) on GPU 1; then, on both, the 131K cp=2 training run (20 steps)
             ( export CUDA_VISIBLE_DEVICES=0 RUNLOG="$OUT/running_gpu0.log"
               run tests_kernels_gpu 90 "passed|failed|error" python3 -m pytest -m gpu -v -p no:cacheprovider \
                 -c "$R/pyproject.toml" --rootdir "$R" "$R/tests/test_short_conv.py" "$R/tests/test_rms_norm_kernel.py" \
                 "$R/tests/test_swiglu_kernel.py" "$R/tests/test_rope_kernel.py"
               bench32k none 150 model.activation_checkpointing=none model.compile=false ) &
             gpu0=$!
             ( export CUDA_VISIBLE_DEVICES=1 RUNLOG="$OUT/running_gpu1.log"
               run reach_h1 240 "$SUMMARY" $LC bench train "$H1" model.mlp_chunk_tokens=65536 \
                 model.checkpoint_offload=true train.grad_accum=1 --lengths 524288 786432 1048576 \
                 --json "$RES/reach_h1.json" ) &
             wait "$gpu0" $!  # (a bare wait would also wait for the console's tee)
             pack
             rm -rf /tmp/runs/h1_131k_cp2
             run train_h1_131k_cp2 330 "$SUMMARY|^step +(1|2|5|10|15|19|20)/20 " \
               $LC train "$H1" data.seq_len=131072 parallel.cp=2 train.steps=20 train.warmup_steps=5 \
               train.out_dir=/tmp/runs/h1_131k_cp2 train.resume=false train.progress=false
             cp /tmp/runs/h1_131k_cp2/metrics.jsonl "$RES/train_h1_131k_cp2_metrics.jsonl" 2>/dev/null ;;
    quick) run tests_fused_gpu 120 "passed|failed|error" python3 -m pytest -m gpu -v -p no:cacheprovider \
             -c "$R/pyproject.toml" --rootdir "$R" "$R/tests/test_short_conv.py" "$R/tests/test_fused.py" "$R/tests/test_rms_norm_kernel.py" "$R/tests/test_swiglu_kernel.py" \
             "$R/tests/test_rope_kernel.py"
           bench32k selS 130 model.activation_checkpointing=selective:S model.compile=false
           bench32k none_compile 160 model.activation_checkpointing=none model.compile=true ;;
    compare) bench32k selS_compile 160 model.activation_checkpointing=selective:S model.compile=true
             bench32k none 130 model.activation_checkpointing=none model.compile=false ;;
    bench_full) bench32k full 120 model.activation_checkpointing=full ;;
    reach|maxlen) run reach_h1 240 "$SUMMARY" $LC bench train "$H1" model.mlp_chunk_tokens=65536 model.checkpoint_offload=true \
             train.grad_accum=1 --lengths 262144 524288 786432 1048576 --json "$RES/reach_h1.json" ;;
    reach_cp2|maxlen_cp2) run reach_h1_cp2 "${REACH_CP2_S:-240}" "$SUMMARY" $LC bench train "$H1" parallel.cp=2 model.mlp_chunk_tokens=65536 \
                 model.checkpoint_offload=true train.grad_accum=1 --lengths ${REACH_CP2_LENGTHS:-1048576 1572864 2097152} \
                 --json "$RES/reach_h1_cp2.json" ;;
    train131k_cp2) rm -rf /tmp/runs/h1_131k_cp2  # a warm machine's earlier run would make train.resume=false refuse
                   run train_h1_131k_cp2 330 "$SUMMARY|^step +(1|2|5|10|15|19|20)/20 " \
                     $LC train "$H1" data.seq_len=131072 parallel.cp=2 train.steps=20 train.warmup_steps=5 \
                     train.out_dir=/tmp/runs/h1_131k_cp2 train.resume=false train.progress=false
                   cp /tmp/runs/h1_131k_cp2/metrics.jsonl "$RES/train_h1_131k_cp2_metrics.jsonl" 2>/dev/null ;;
    tests) run tests_gpu 170 "passed|failed|error" python3 -m pytest -m gpu -v -s -p no:cacheprovider \
             -c "$R/pyproject.toml" --rootdir "$R" "$R/tests/test_long_context_gpu.py" "$R/tests/test_short_conv.py" "$R/tests/test_fused.py" \
             "$R/tests/test_rms_norm_kernel.py" "$R/tests/test_swiglu_kernel.py" \
             "$R/tests/test_rope_kernel.py" ;;
    actmem) run actmem_h1 60 "KiB" $LC bench train "$H1" --activation-memory --json "$RES/actmem_h1.json"
            run actmem_h2 60 "KiB" $LC bench train "$R/recipes/gdn_h2_1p3b.yaml" --activation-memory \
              --json "$RES/actmem_h2.json" ;;
    sanity) rm -rf /tmp/runs/sanity  # a warm machine's earlier run would make train.resume=false refuse
            run train_sanity 150 "step +10|loss|Error" $LC train "$H1" model.d_model=512 model.n_heads=4 \
              model.attn_heads=4 model.layer_pattern=GSGS data.seq_len=4096 train.steps=10 train.warmup_steps=2 \
              train.grad_accum=1 train.log_every=1 train.out_dir=/tmp/runs/sanity train.resume=false \
              train.progress=false ;;
    train131k) rm -rf /tmp/runs/h1_131k  # a warm machine's earlier run would make train.resume=false refuse
               run train_h1_131k 330 "$SUMMARY|^step +(1|2|5|10|15|19|20)/20 " \
                 $LC train "$H1" data.seq_len=131072 train.steps=20 train.grad_accum=1 train.warmup_steps=5 \
                 train.out_dir=/tmp/runs/h1_131k train.resume=false train.progress=false ;;
    pptests) run tests_pp_gpu 560 "passed|failed|error" python3 -m pytest -m gpu -v -s -p no:cacheprovider \
               -c "$R/pyproject.toml" --rootdir "$R" "$R/tests/test_pp_gpu.py" ;;
    layouts) rm -rf /tmp/runs/layouts  # a warm machine's earlier runs would refuse train.resume=false
             len=${LAYOUTS_LEN:-65536}; tag=h1_$((len / 1024))k
             run layouts_$tag "${LAYOUTS_S:-590}" "$SUMMARY|^\{'layout'|held memory" $LC bench layouts "$H1" \
               data.seq_len=$len --layouts ${LAYOUTS:-tp=1 tp=2 cp=2 pp=2} --steps 5 \
               --warmup 2 --time-limit $(( ${LAYOUTS_S:-590} - 150 )) --out-dir /tmp/runs/layouts \
               --json "$RES/layouts_$tag.json"
             for f in /tmp/runs/layouts/*/train.log; do cp "$f" "$RES/layouts_${tag}_$(basename "$(dirname "$f")").log"; done
             rm -rf /tmp/runs/layouts ;;
    *) echo "unknown step $s" ;;
  esac
  pack
done
echo "=== done $(date +%T)"
