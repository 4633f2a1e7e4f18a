#!/usr/bin/env bash
# On a host with two GPUs: the tensor-parallel tests (NCCL) and the TP=1 vs TP=2 benchmark on a
# Llama-2-7B-shaped checkpoint, pre-quantized (by `python -m engine.quantize`) and in flight.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu_x2.txt"
timeout 420 python3 -m pytest tests/workers -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/pytest_workers_gpu.log"
if [ "${PIPESTATUS[0]}" = 124 ]; then echo "tensor-parallel tests timed out: no benchmark"; exit 1; fi
python3 benchmarks/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b
python3 -m engine.quantize /tmp/llama2-7b /tmp/llama2-7b-nf4 2>&1 | grep -v "it/s"
timeout 280 python3 benchmarks/tp_decode.py --model /tmp/llama2-7b --prequantized /tmp/llama2-7b-nf4 \
  --out "$OUT/tp_decode_h200x2_llama2_7b.json" 2>&1 | grep -v "it/s\|tensor/s" | tail -40
