#!/usr/bin/env bash
# On one GPU host, for work on how a decode step's kernels follow each other (programmatic
# dependent launch): the GPU tests of every kernel it touches, the engine's GPU tests (greedy
# tokens against transformers + bitsandbytes), then end-to-end decode side by side and the
# decode-step profile (benchmarks/gpu_side_by_side.sh).
set -uo pipefail
OUT=$(realpath "${OUT:-benchmarks/results}")
export OUT PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
timeout 260 python3 -m pytest tests/kernels/test_fused_ops.py tests/kernels/test_matmul_4bit.py \
  tests/engine/test_gpu_kernels.py tests/engine/test_gpu.py -q -p no:cacheprovider \
  -k "not (test_matmul_4bit and not (variant or fp16 or deterministic))" \
  > "$OUT/pytest_step_kernels_gpu.log" 2>&1
ok=$?
tail -3 "$OUT/pytest_step_kernels_gpu.log"
[ "$ok" = 0 ] || exit 1
bash benchmarks/gpu_side_by_side.sh
