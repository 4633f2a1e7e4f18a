#!/usr/bin/env bash
# On one GPU host: end-to-end decode on a random Llama-2-7B-shaped checkpoint, side by side in
# one run (in-flight NF4 vs transformers + bnb vs nibble bf16 vs the roofline; load times), then
# the decode-step profile. benchmarks/gpu_e2e.sh and gpu_step_checks.sh begin with it.
set -uo pipefail
OUT=$(realpath "${OUT:-benchmarks/results}")
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 benchmarks/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b > /dev/null
cd benchmarks
timeout 300 python3 offline_throughput.py --model /tmp/llama2-7b --shape llama2-7b \
  --batch-sizes 1 16 64 --prompt-len 128 --output-len 128 --compare-bf16 --prequantized-load \
  --kv-cache-gib 16 --out "$OUT/offline_throughput_h200_llama2_7b.json" 2>&1 \
  | grep -v "it/s\|Loading\|Quantizing" | tee "$OUT/offline_throughput.log" | tail -16
timeout 110 python3 profile_decode.py --model /tmp/llama2-7b --batch-sizes 1 64 \
  --out "$OUT/profile_decode_h200_llama2_7b.json" 2>&1 | grep -v "it/s\|Loading" | tail -8
