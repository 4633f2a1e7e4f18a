#!/usr/bin/env bash
# On one GPU host: end-to-end decode side by side and the decode-step profile
# (benchmarks/gpu_side_by_side.sh), then the same run with an fp8 KV cache, then whether decode
# steps run ahead of the host (async scheduling).
set -uo pipefail
OUT=$(realpath "${OUT:-benchmarks/results}")
export OUT PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
bash benchmarks/gpu_side_by_side.sh
cd benchmarks
# The same with an fp8 KV cache (Llama-2-7B has no GQA: at batch 64 the cache reads rival the
# weights'), ours only.
timeout 200 python3 offline_throughput.py --model /tmp/llama2-7b --shape llama2-7b \
  --batch-sizes 16 64 --prompt-len 128 --output-len 128 --compare-bf16 --skip-transformers \
  --kv-cache-gib 16 --kv-cache-dtype fp8 \
  --out "$OUT/offline_throughput_h200_llama2_7b_fp8_kv.json" 2>&1 \
  | grep -v "it/s\|Loading\|Quantizing" | tail -3
timeout 120 python3 async_check.py --model /tmp/llama2-7b --batch-sizes 64 16 1 \
  --out "$OUT/async_check_h200_llama2_7b.json" 2>&1 | grep -A4 '"batch"\|gpu_ms' | tail -24
