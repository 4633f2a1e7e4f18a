#!/usr/bin/env bash
# One GPU call (two GPUs): train the demo model, re-check TP=2 vs TP=1 on the 7B shape in
# float32 (so only summation order differs), and rerun the engine's test suite on CUDA.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
python3 benchmarks/demo_model/train.py --corpus .corpus --out /tmp/demo_model 2>&1 | tail -40
tar -cf "$OUT/demo_model.tar" -C /tmp demo_model
python3 benchmarks/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b
python3 -m engine.quantize /tmp/llama2-7b /tmp/llama2-7b-nf4-f32 --compute-dtype float32 2>&1 | grep -v "it/s"
python3 benchmarks/tp_decode.py --model /tmp/llama2-7b --prequantized /tmp/llama2-7b-nf4-f32 \
  --dtype float32 --check-only --out "$OUT/tp_check_h200x2_llama2_7b_fp32.json" 2>&1 | grep -v "it/s\|tensor/s\|socket.cpp" | tail -20
python3 -m pytest tests/engine -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/pytest_engine_gpu.log" | tail -8
