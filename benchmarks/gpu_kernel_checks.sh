#!/usr/bin/env bash
# On one GPU host: the kernel tests; with TUNE=1 then re-measure the fused 4-bit matmul (writes
# engine/kernels/configs/<gpu>.json; TUNE_ARGS passes options, e.g. "--buckets 32 64 128
# --kernels wgmma" re-tunes those buckets' warpgroup launches and keeps the rest; "--twins"
# measures the table's launches against their mma_in_flight twins) and time it per layer against
# bitsandbytes and bf16; without TUNE, then the GPU engine tests on the table that ships.
# Results go to $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 300 python3 -m pytest tests/kernels -q --tb=short -p no:cacheprovider > "$OUT/pytest_kernels_gpu.log" 2>&1
kernels_ok=$?
tail -3 "$OUT/pytest_kernels_gpu.log"
# A kernel that faults would poison the tuner's CUDA context for every later candidate.
if [ "${TUNE:-0}" = 1 ] && [ "$kernels_ok" != 0 ]; then
  echo "kernel tests failed: not tuning"
elif [ "${TUNE:-0}" = 1 ]; then
  python3 benchmarks/tune_matmul_4bit.py --out-dir engine/kernels/configs ${TUNE_ARGS:-} 2>&1 | grep -v OutOfResources | tail -30 | tee "$OUT/tune_matmul_4bit.log"
  # One archive of the tables and the measurements: a device run brings back at most 8 files.
  tar czf "$OUT/tune_configs.tgz" -C engine/kernels/configs .
  python3 benchmarks/linear_4bit.py --out "$OUT/linear_4bit_h200.json" 2>&1 | tail -8 | tee "$OUT/linear_4bit.log"
fi
# A tuning run leaves these to the next call: with them it would pass a device call's 10 minutes.
if [ "${TUNE:-0}" != 1 ]; then
  timeout 150 python3 -m pytest tests/engine/test_gpu.py tests/engine/test_gpu_kernels.py -q --tb=short \
    -p no:cacheprovider > "$OUT/pytest_engine_gpu_kernels.log" 2>&1
  tail -3 "$OUT/pytest_engine_gpu_kernels.log"
fi
