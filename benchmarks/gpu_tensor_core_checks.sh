#!/usr/bin/env bash
# On one GPU host, for work on the tensor-core kernels (batches of 16 and up): the kernel
# variant tests, a re-tune of those buckets (or $BUCKETS) among the "wgmma" and "mma" kernels
# (the other buckets' entries are kept), and the per-layer times at every bucket with the new
# table. Results go to $OUT; the engine's tests and end-to-end runs are gpu_step_checks.sh.
set -uo pipefail
OUT=$(realpath "${OUT:-benchmarks/results}")
BUCKETS=${BUCKETS:-16 32 64 128 256}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest tests/kernels/test_matmul_4bit.py -q --tb=short -p no:cacheprovider \
  -k "variant or fp16 or deterministic" > "$OUT/pytest_kernels_variants_gpu.log" 2>&1
ok=$?
tail -3 "$OUT/pytest_kernels_variants_gpu.log"
[ "$ok" = 0 ] || exit 1
timeout 320 python3 benchmarks/tune_matmul_4bit.py --buckets $BUCKETS --kernels wgmma mma \
  --out-dir engine/kernels/configs 2>&1 | grep -v OutOfResources \
  | tee "$OUT/tune_matmul_4bit_tensor_core.log" | grep "best per kernel\|wrote\|compile"
cp engine/kernels/configs/*.json "$OUT/"
timeout 60 python3 benchmarks/linear_4bit.py --out "$OUT/linear_4bit_h200.json" 2>&1 | tail -8 \
  | tee "$OUT/linear_4bit.log"
