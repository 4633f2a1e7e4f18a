#!/usr/bin/env bash
# On one GPU host, for work on how a decode step's kernels follow each other (programmatic
# dependent launch): the GPU tests of every kernel it touches, the engine's GPU tests (greedy
# tokens against transformers + bitsandbytes), end-to-end decode side by side (nibble NF4 vs
# transformers + bnb vs nibble bf16, as benchmarks/gpu_e2e.sh runs it) and the decode-step
# profile.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
timeout 260 python3 -m pytest tests/kernels/test_fused_ops.py tests/kernels/test_matmul_4bit.py \
  tests/engine/test_gpu_kernels.py tests/engine/test_gpu.py -q -p no:cacheprovider \
  -k "not (test_matmul_4bit and not (variant or fp16 or deterministic))" \
  > "$OUT/pytest_step_kernels_gpu.log" 2>&1
ok=$?
tail -3 "$OUT/pytest_step_kernels_gpu.log"
[ "$ok" = 0 ] || exit 1
python3 benchmarks/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b > /dev/null
cd benchmarks
timeout 300 python3 offline_throughput.py --model /tmp/llama2-7b --shape llama2-7b \
  --batch-sizes 1 16 64 --prompt-len 128 --output-len 128 --compare-bf16 --prequantized-load \
  --kv-cache-gib 16 --out "$OUT/offline_throughput_h200_llama2_7b.json" 2>&1 \
  | grep -v "it/s\|Loading\|Quantizing" | tee "$OUT/offline_throughput.log" | tail -6
timeout 110 python3 profile_decode.py --model /tmp/llama2-7b --batch-sizes 1 64 \
  --out "$OUT/profile_decode_h200_llama2_7b.json" 2>&1 | grep -v "it/s\|Loading" | tail -4
