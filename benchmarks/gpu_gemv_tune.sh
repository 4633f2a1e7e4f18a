#!/usr/bin/env bash
# On one GPU host, for GEMV work: a re-tune of batch bucket 1 among GEMV launches only (the other
# entries are kept; the tuner checks every launch against the reference), the batch-1 per-layer
# times, then the kernel variant tests. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
timeout 120 python3 benchmarks/tune_matmul_4bit.py --buckets 1 --kernels gemv \
  --out-dir engine/kernels/configs 2>&1 | grep -v OutOfResources | tail -4 | tee "$OUT/tune_gemv_b1.log"
cp engine/kernels/configs/*.json "$OUT/"
timeout 40 python3 benchmarks/linear_4bit.py --batch-sizes 1 --out "$OUT/linear_4bit_h200_b1.json" \
  2>&1 | tail -3 | tee "$OUT/linear_4bit_b1.log"
timeout 100 python3 -m pytest tests/kernels/test_matmul_4bit.py -q --tb=short -p no:cacheprovider \
  -k "variant" > "$OUT/pytest_kernels_variants_gpu.log" 2>&1
tail -2 "$OUT/pytest_kernels_variants_gpu.log"
