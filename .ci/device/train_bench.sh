#!/usr/bin/env bash
# One device call on an H200 (or H100): GPU tests of the long-context memory savers, a short real
# `lctrain train` (sanity), `lctrain bench train` of the 1.3B GDN-H1 at 32K (checkpointing none,
# selective:S, full) and the longest context one training step of it runs at. Run from the repository root
# on the GPU machine, carrying `.whl` (built here by `bash .ci/device/build_wheels.sh`):
#     bash .ci/device/train_bench.sh [tests] [sanity] [bench] [maxlen] [train131k] [maxlen_cp2] [train131k_cp2]
#         [pptests] [layouts]
# (default: tests sanity bench, ~5 minutes; then a second call `maxlen train131k`, ~6 minutes; bench also
# measures the activations each block kind saves per token, H1 and H2). train131k: 20 real steps of gdn_h1_1p3b at 131K on
# one GPU; maxlen_cp2 / train131k_cp2: the length search from 512K and the 131K run with parallel.cp=2
# (2 GPUs). pptests: pipeline parallelism pp=2 vs one GPU (2 GPUs); layouts: `lctrain bench layouts` of
# gdn_h1_1p3b at 64K, tp=2 / cp=2 / pp=2 side by side (2 GPUs; LAYOUTS="pp=2" for one). Every step's full output (pytest's
# included) and JSON go to $OUT/results/; copy that folder into docs/results/<date>_train_bench/ and
# record the JSONs with `lctrain bench record docs/results/<...>/*.json`.
set -u
STEPS="${*:-tests sanity bench}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=$PWD
OUT=${OUT:-/tmp/out}; RES="$OUT/results"; mkdir -p "$RES" /tmp/tcache
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
} 2>&1 | tee "$RES/install.log"
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
LC="python3 -m lctrain.cli"
H1="$R/recipes/gdn_h1_1p3b.yaml"
cd /tmp
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$RES/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$RES/gpu.txt"
for s in $STEPS; do
  echo "=== $s $(date +%T)"
  case $s in
    tests) timeout 180 python3 -m pytest -m gpu -v -s -p no:cacheprovider -c "$R/pyproject.toml" --rootdir "$R" \
             "$R/tests/test_long_context_gpu.py" > "$RES/tests_long_context_gpu.log" 2>&1; tail -5 "$RES/tests_long_context_gpu.log" ;;
    sanity) timeout 150 $LC train "$H1" model.d_model=512 model.n_heads=4 model.attn_heads=4 model.layer_pattern=GSGS \
              data.seq_len=4096 train.steps=10 train.warmup_steps=2 train.grad_accum=1 train.log_every=1 \
              train.out_dir=/tmp/runs/sanity train.resume=false train.progress=false 2>&1 | tee "$RES/train_sanity.log" | tail -4 ;;
    bench) timeout 60 $LC bench train "$H1" --activation-memory --json "$RES/actmem_h1.json" 2>&1 | tee "$RES/actmem_h1.log" | tail -3
           timeout 60 $LC bench train "$R/recipes/gdn_h2_1p3b.yaml" --activation-memory --json "$RES/actmem_h2.json" 2>&1 | tee "$RES/actmem_h2.log" | tail -3
           for mode in none selective:S full; do
             tag=${mode/:/_}
             timeout 120 $LC bench train "$H1" model.activation_checkpointing=$mode --steps 5 --warmup 2 \
               --json "$RES/bench_h1_32k_$tag.json" 2>&1 | tee "$RES/bench_h1_32k_$tag.log" | grep -v "^step\|^warm"
           done ;;
    maxlen) timeout 240 $LC bench train "$H1" model.mlp_chunk_tokens=65536 model.checkpoint_offload=true train.grad_accum=1 \
              --lengths 131072 262144 524288 786432 1048576 --json "$RES/maxlen_h1.json" 2>&1 | tee "$RES/maxlen_h1.log" | tail -8 ;;
    maxlen_cp2) timeout 300 $LC bench train "$H1" parallel.cp=2 model.mlp_chunk_tokens=65536 model.checkpoint_offload=true \
              train.grad_accum=1 --lengths 524288 1048576 1572864 --json "$RES/maxlen_h1_cp2.json" 2>&1 | tee "$RES/maxlen_h1_cp2.log" | tail -8 ;;
    train131k) timeout 330 $LC train "$H1" data.seq_len=131072 train.steps=20 train.grad_accum=1 train.warmup_steps=5 \
                 train.out_dir=/tmp/runs/h1_131k train.resume=false train.progress=false 2>&1 | tee "$RES/train_h1_131k.log" | tail -25 ;;
    train131k_cp2) timeout 560 $LC train "$H1" data.seq_len=131072 parallel.cp=2 train.steps=20 train.warmup_steps=5 \
                 train.out_dir=/tmp/runs/h1_131k_cp2 train.resume=false train.progress=false 2>&1 | tee "$RES/train_h1_131k_cp2.log" | tail -25 ;;
    pptests) timeout 560 python3 -m pytest -m gpu -v -s -p no:cacheprovider -c "$R/pyproject.toml" --rootdir "$R" \
               "$R/tests/test_pp_gpu.py" > "$RES/tests_pp_gpu.log" 2>&1; tail -8 "$RES/tests_pp_gpu.log" ;;
    layouts) rm -rf /tmp/runs/layouts  # a warm machine's earlier runs would refuse train.resume=false
             timeout 590 $LC bench layouts "$H1" data.seq_len=65536 train.loss_chunk_tokens=0 \
               --layouts ${LAYOUTS:-tp=2 cp=2 pp=2} --steps 5 --warmup 2 --out-dir /tmp/runs/layouts \
               --json "$RES/layouts_h1_64k.json" 2>&1 | tee "$RES/layouts_h1_64k.log" | tail -8
             for f in /tmp/runs/layouts/*/train.log; do cp "$f" "$RES/layouts_$(basename "$(dirname "$f")").log"; done ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "=== done $(date +%T)"
