#!/usr/bin/env bash
# On a host with two GPUs: every engine step of a decode run, TP=2 and TP=1, on the pre-quantized
# Llama-2-7B-shaped checkpoint (benchmarks/step_trace.py), to see where TP=2's time goes.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
python3 benchmarks/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b > /dev/null
python3 -m engine.quantize /tmp/llama2-7b /tmp/llama2-7b-nf4 2>&1 | grep -v "it/s" | tail -2
cd benchmarks
for tp in 2 1; do
  timeout 240 python3 step_trace.py --model /tmp/llama2-7b-nf4 --quantization "" \
    --tensor-parallel-size $tp --batch 1 16 64 --output-len 64 \
    --out "$OUT/step_trace_h200x2_tp${tp}.json" 2>&1 | grep '^{' | cut -c1-400
done
