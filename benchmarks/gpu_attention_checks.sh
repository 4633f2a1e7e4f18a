#!/usr/bin/env bash
# On one GPU host: decode attention over bf16 and fp8 KV caches. The attention kernel tests
# (fp8 cases run only on a GPU), benchmarks/decode_attention.py with its launch variants, then
# end-to-end decode at batch 16 and 64 with the model's cache and with an fp8 one (ours only,
# one checkpoint, one machine). Five files go to $OUT (required), named by the GPU.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT" && OUT=$(realpath "$OUT")
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr ' ' '_')
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b > /dev/null &
checkpoint=$!
timeout 200 python3 -m pytest tests/kernels/test_fused_ops.py -q --tb=short -p no:cacheprovider \
  -k "decode or split or fp16_dots" > "$OUT/pytest_attention_${gpu}.log" 2>&1
tail -n 3 "$OUT/pytest_attention_${gpu}.log"
timeout 200 python3 benchmarks/decode_attention.py --launch-variants \
  --out "$OUT/decode_attention_${gpu}.json" | tail -n 9
wait $checkpoint
cd benchmarks
for cache in auto fp8; do
  timeout 150 python3 offline_throughput.py --model /tmp/llama2-7b --shape llama2-7b \
    --batch-sizes 16 64 --prompt-len 128 --output-len 128 --skip-transformers --kv-cache-gib 16 \
    --kv-cache-dtype $cache --out "$OUT/offline_throughput_${gpu}_llama2_7b_${cache}_kv.json" 2>&1 \
    | grep -v "it/s\|Loading\|Quantizing" | tail -n 3
done
