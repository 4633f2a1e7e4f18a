#!/usr/bin/env bash
# On one GPU host: an Nsight Compute profile of the tuned batch-1 GEMV on each Llama-2-7B layer
# (benchmarks/ncu_linear.py): throughput, issue, stall and occupancy sections, to $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
timeout 120 /usr/local/cuda/bin/ncu --kernel-name regex:gemv_4bit --launch-skip 8 --launch-count 4 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section LaunchStats --section MemoryWorkloadAnalysis --section InstructionStats \
  python3 benchmarks/ncu_linear.py --batch-sizes 1 > "$OUT/ncu_gemv_table_b1.txt" 2>&1
echo "ncu rc $?"; grep -E "Duration|DRAM Throughput|Issued Warp|No Eligible|Registers Per|Achieved Occ|Theoretical Occ" "$OUT/ncu_gemv_table_b1.txt" | head -40
