#!/usr/bin/env bash
# On one GPU host: end-to-end decode on a random Llama-2-7B-shaped checkpoint (in-flight NF4 vs
# transformers + bnb vs nibble bf16 vs the roofline; load times), then whether decode steps run
# ahead of the host (async scheduling), then a decode-step profile.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 benchmarks/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b > /dev/null
cd benchmarks
timeout 300 python3 offline_throughput.py --model /tmp/llama2-7b --shape llama2-7b \
  --batch-sizes 1 16 64 --prompt-len 128 --output-len 128 --compare-bf16 --prequantized-load \
  --kv-cache-gib 16 --out "$OUT/offline_throughput_h200_llama2_7b.json" 2>&1 \
  | grep -v "it/s\|Loading\|Quantizing" | tee "$OUT/offline_throughput.log" | tail -16
# The same with an fp8 KV cache (Llama-2-7B has no GQA: at batch 64 the cache reads rival the
# weights'), ours only.
timeout 200 python3 offline_throughput.py --model /tmp/llama2-7b --shape llama2-7b \
  --batch-sizes 16 64 --prompt-len 128 --output-len 128 --compare-bf16 --skip-transformers \
  --kv-cache-gib 16 --kv-cache-dtype fp8 \
  --out "$OUT/offline_throughput_h200_llama2_7b_fp8_kv.json" 2>&1 \
  | grep -v "it/s\|Loading\|Quantizing" | tail -3
timeout 120 python3 async_check.py --model /tmp/llama2-7b --batch-sizes 64 16 1 \
  --out "$OUT/async_check_h200_llama2_7b.json" 2>&1 | grep -A4 '"batch"\|gpu_ms' | tail -24
timeout 110 python3 profile_decode.py --model /tmp/llama2-7b \
  --out "$OUT/profile_decode_h200_llama2_7b.json" 2>&1 | grep -v "it/s\|Loading" | tail -8
