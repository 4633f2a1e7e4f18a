#!/usr/bin/env bash
# On one GPU host: Nsight Compute profiles of the warpgroup kernels on Llama-2-7B's gate_up at 64
# rows (benchmarks/ncu_linear.py): the TMA-fed warp-specialized launch the tuner measured best
# for it, and the plain launch the table ships. Throughput, issue, stall (with the top stall
# locations) and occupancy sections, to $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
NCU="/usr/local/cuda/bin/ncu --kernel-name regex:wgmma --launch-skip 4 --launch-count 1
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy
  --section MemoryWorkloadAnalysis --section InstructionStats --section SourceCounters"
TMA='{"kernel": "wgmma", "block_m": 64, "block_n": 128, "block_k": 128, "split_k": 2,
  "num_warps": 4, "num_stages": 4, "w_left": false, "decode_warps": 8, "tma": true}'
timeout 150 $NCU python3 benchmarks/ncu_linear.py --batch-sizes 64 --layers gate_up \
  --config "$TMA" > "$OUT/ncu_wgmma_tma_b64_gate_up.txt" 2>&1
echo "ncu tma rc $?"
timeout 150 $NCU python3 benchmarks/ncu_linear.py --batch-sizes 64 --layers gate_up \
  > "$OUT/ncu_wgmma_b64_gate_up.txt" 2>&1
echo "ncu plain rc $?"
for f in "$OUT"/ncu_wgmma*_b64_gate_up.txt; do
  echo "== $f"
  grep -E "Duration|DRAM Throughput|Issued Warp|No Eligible|Registers Per|Achieved Occ|L1/TEX Cache|Compute \(SM\)" "$f" | head -12
done
