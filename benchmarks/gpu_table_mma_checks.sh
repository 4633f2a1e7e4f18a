set -uo pipefail
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
timeout 120 /usr/local/cuda/bin/ncu --kernel-name regex:gemv_4bit --launch-skip 8 --launch-count 4 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section LaunchStats --section MemoryWorkloadAnalysis --section InstructionStats \
  python3 benchmarks/ncu_linear.py --batch-sizes 1 > "$OUT/ncu_gemv_table_b1.txt" 2>&1
echo "ncu rc $?"; grep -E "Duration|DRAM Throughput|Issued Warp|No Eligible|Registers Per|Achieved Occ|Theoretical Occ" "$OUT/ncu_gemv_table_b1.txt" | head -40
timeout 150 python3 -m pytest tests/kernels/test_matmul_4bit.py -q --tb=short -p no:cacheprovider \
  -k "variant" > "$OUT/pytest_kernels_variants_gpu.log" 2>&1; tail -2 "$OUT/pytest_kernels_variants_gpu.log"
timeout 240 python3 benchmarks/tune_matmul_4bit.py --buckets 1 8 --out-dir /tmp/tuned \
  2>&1 | grep -v OutOfResources | tail -8 | tee "$OUT/tune_table_mma.log"
cp /tmp/tuned/*.json "$OUT/"
