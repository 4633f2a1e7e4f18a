#!/usr/bin/env bash
# On one GPU host: the engine's test suite on CUDA (bf16 oracle tests included) and the offline
# throughput benchmark on a small and a Llama-2-7B-shaped checkpoint. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest tests/engine -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/pytest_engine_gpu.log"
cd benchmarks
python3 offline_throughput.py --shape small --batch-sizes 1 16 64 --prompt-len 128 --output-len 128 \
  --out "$OUT/offline_throughput_h200_small.json" 2>&1 | grep -v "it/s" | tail -8
python3 make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b
python3 offline_throughput.py --model /tmp/llama2-7b --shape llama2-7b --batch-sizes 1 16 64 \
  --prompt-len 128 --output-len 128 --out "$OUT/offline_throughput_h200_llama2_7b.json" 2>&1 \
  | grep -v "it/s" | tail -12
