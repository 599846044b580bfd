#!/usr/bin/env bash
# One device call: install, (optionally) GPU tests, kernel bench with fla in-process, per-kernel
# profile, a launch-setting sweep. Run from the repository root on the GPU machine:
#   bash .ci/device/bench.sh [tests] [bench] [profile] [sweep] [tune] [varlen] [variants] [kperf] [kperf_fla]
#                            [cptests] [cp]
# (default: the first four; cptests and cp need 2 GPUs: context parallelism tests and `lctrain bench cp`).
# variants: `python -m lctrain.bench.variants` (issue 12) against the kernels/triton trees carried in
# .device/presplit and .device/split (`git archive 5404906 kernels/triton | tar x -C .device/presplit`,
# the same with df18be3 for split; each is skipped with a note where it is absent). kperf: variants plus
# the packed paths under several state-pass settings (~3 min, no fla); kperf_fla: the packed paths vs fla.
# Carry `.whl` (fla_core wheel) and `.tcache` (Triton cache from an earlier call: compiled kernels
# and fla's autotune results; saves minutes). Results land in $OUT.
set -u
STEPS="${*:-tests bench profile sweep}"
# TUNE_ARGS: extra arguments of lctrain.bench.tune_kernels (e.g. "--kernels dqk --methods delta");
# TEST_ARGS: extra pytest arguments of the tests step (e.g. "-k 256");
# VARLEN_ARGS: arguments of `lctrain bench varlen` (packed documents; default 64 documents in 128K);
# VARIANTS_ARGS: extra arguments of lctrain.bench.variants (e.g. "--ops gated_delta delta");
# PROFILE_ARGS: arguments of lctrain.bench.profile_kernels (default --T 131072)
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache FLA_CACHE_RESULTS=1
R=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/tcache
[ -f .tcache/autotune.tgz ] && tar xzf .tcache/autotune.tgz -C /tmp/tcache
if [ "${BENCH_NO_INSTALL:-0}" != 1 ]; then  # 1: /tmp/site is already installed (another job of the call uses it)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1  # --upgrade: a warm machine keeps /tmp/site
fi
export PYTHONPATH=/tmp/site
cd /tmp
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,utilization.gpu --format=csv
# only the autotune choices travel back (the compiled kernels are too large for one file)
save_cache() { (cd /tmp/tcache && find . -name '*.autotune.json' | tar czf "$OUT/autotune.tgz" -T -) \
  && ls -la "$OUT/autotune.tgz"; }
for s in $STEPS; do
  echo "=== $s $(date +%T)"
  case $s in
    tests) python3 -m pytest -m gpu -q -x -p no:cacheprovider -c "$R/pyproject.toml" --rootdir "$R" ${TEST_ARGS:-} \
             "$R/tests/test_kernels_gpu.py" "$R/tests/test_kernels_varlen.py" 2>&1 | tail -5 ;;
    bench) python3 -m lctrain.cli bench kernels --json "$OUT/bench.json" \
             ${BENCH_ARGS:---warmup 10 --rep 50} 2>&1 | tee "$OUT/bench.txt" | grep -v "^T="; save_cache ;;
    profile) python3 -m lctrain.bench.profile_kernels ${PROFILE_ARGS:---T 131072} > "$OUT/profile.txt" 2>&1; save_cache ;;
    sweep) python3 -m lctrain.cli bench kernels --T 65536 --no-sdpa --no-fla --warmup 5 --rep 30 \
             --methods delta gated_delta gla --json "$OUT/sweep.json" ${SWEEP:-} 2>&1 \
             | tee "$OUT/sweep.txt" | grep -v "^T=" ;;
    varlen) python3 -m lctrain.cli bench varlen --json "$OUT/varlen.json" ${VARLEN_ARGS:-} 2>&1 \
             | tee "$OUT/varlen.txt"; save_cache ;;
    variants) python3 -m lctrain.bench.variants --tree "presplit:$R/.device/presplit/kernels/triton" \
             --tree "split:$R/.device/split/kernels/triton" --json "$OUT/variants.json" ${VARIANTS_ARGS:-} 2>&1 \
             | tee "$OUT/variants.txt" ;;
    kperf) # issues 12 and 13 in ~3 minutes, no fla: the state_fwd variants, the packed paths under
           # V-block settings of the state passes (default = wide), the per-kernel split of the packed path
           python3 -m lctrain.bench.variants --tree "presplit:$R/.device/presplit/kernels/triton" \
             --tree "split:$R/.device/split/kernels/triton" --ops gated_delta delta --rep 100 \
             --json "$OUT/variants.json" 2>&1 \
             | tee "$OUT/variants.txt"
           python3 -m lctrain.cli bench varlen --ops delta gated_delta --paths one packed --warmup 10 --rep 60 \
             --variant narrow:BVS=16,BVSB=16 --variant bv32:BVS=32,BVSB=32 \
             --variant bv64s2:BVS=64,BVSB=64,stages_seq=2,stages_seqb=2 --variant bv64fs2:BVS=64,BVSB=64,stages_seq=2 \
             --json "$OUT/varlen_variants.json" 2>&1 \
             | tee "$OUT/varlen_variants.txt"
           python3 -m lctrain.bench.profile_kernels --T 131072 --docs 64 --no-fla --methods delta gated_delta \
             > "$OUT/profile_packed.txt" 2>&1 ;;
    kperf_fla) # issue 13 against fla (its first varlen call autotunes: minutes): packed ours (wide and
           # narrow) vs fla's varlen path, and the per-kernel split of both
           python3 -m lctrain.cli bench varlen --ops delta gated_delta --paths packed fla --warmup 10 --rep 60 \
             --variant narrow:BVS=16,BVSB=16 --json "$OUT/varlen_fla.json" 2>&1 | tee "$OUT/varlen_fla.txt"
           save_cache
           python3 -m lctrain.bench.profile_kernels --T 131072 --docs 64 \
             --methods delta gated_delta fla_delta fla_gated_delta > "$OUT/profile_packed_fla.txt" 2>&1 ;;
    cptests) python3 -m pytest -m gpu -q -p no:cacheprovider -c "$R/pyproject.toml" --rootdir "$R" \
             "$R/tests/test_cp_gpu.py" 2>&1 | tail -15 ;;
    cp) python3 -m lctrain.cli bench cp --nproc 2 --layer gdn delta gla --strong \
          --transition sequential grouped grouped:2 grouped:32 grouped+grad --json "$OUT/cp_linear.json" 2>&1 \
          | tee "$OUT/cp_linear.txt"
        python3 -m lctrain.cli bench cp --nproc 2 --layer swa attn --T 65536 --strong --warmup 2 --iters 5 \
          --json "$OUT/cp_softmax.json" 2>&1 | tee "$OUT/cp_softmax.txt"; save_cache ;;
    tune) python3 -m lctrain.bench.tune_kernels --json "$OUT/tune.json" ${TUNE_ARGS:-} 2>&1 \
             | tee "$OUT/tune.txt" | grep -v "compile failed" ;;
  esac
done
echo "=== done $(date +%T)"
