#!/usr/bin/env bash
# On one GPU host, for work on the fused matmul kernels: their tests, a re-tune of the batch
# buckets up to 8 (or those in $BUCKETS, among the kernel kinds in $KERNELS if set; the other
# buckets' entries are kept), the per-layer times at every bucket, the engine's GPU tests with
# the new table, and batch-1 decode end to end (nibble only). Results go to $OUT. For the
# tensor-core buckets: BUCKETS="16 32 64 128 256" KERNELS="wgmma mma".
set -uo pipefail
OUT=${OUT:-benchmarks/results}
BUCKETS=${BUCKETS:-1 2 4 8}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest tests/kernels/test_matmul_4bit.py -q --tb=short -p no:cacheprovider \
  -k "variant or fp16 or deterministic" > "$OUT/pytest_kernels_variants_gpu.log" 2>&1
ok=$?
tail -3 "$OUT/pytest_kernels_variants_gpu.log"
[ "$ok" = 0 ] || exit 1
timeout 330 python3 benchmarks/tune_matmul_4bit.py --buckets $BUCKETS ${KERNELS:+--kernels $KERNELS} \
  --out-dir engine/kernels/configs \
  2>&1 | grep -v OutOfResources | tail -12 | tee "$OUT/tune_matmul_4bit_small_buckets.log"
cp engine/kernels/configs/*.json "$OUT/"
timeout 100 python3 benchmarks/linear_4bit.py --out "$OUT/linear_4bit_h200.json" 2>&1 | tail -8 \
  | tee "$OUT/linear_4bit.log"
# The engine's GPU tests (greedy tokens against transformers + bitsandbytes) on the new table.
timeout 150 python3 -m pytest tests/engine/test_gpu_kernels.py tests/engine/test_gpu.py -q \
  -p no:cacheprovider > "$OUT/pytest_engine_gpu.log" 2>&1
tail -2 "$OUT/pytest_engine_gpu.log"
python3 benchmarks/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b > /dev/null
cd benchmarks
timeout 150 python3 offline_throughput.py --model /tmp/llama2-7b --shape llama2-7b --batch-sizes 1 \
  --prompt-len 128 --output-len 128 --skip-transformers --kv-cache-gib 16 \
  --out "$OUT/offline_throughput_b1.json" 2>&1 | grep -v "it/s\|Loading\|Quantizing" | tail -4
