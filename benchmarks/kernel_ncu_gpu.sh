#!/usr/bin/env bash
# Nsight Compute on one launch per case of the decode kernel (split + combine), clocks left alone.
#   bash benchmarks/kernel_ncu_gpu.sh SRC_ROOT [CASES] [CONFIG_JSON]
# Writes under $OUT: env.txt, ncu_<i>.txt (details page: speed of light, memory, warp stalls,
# occupancy, launch stats, top stall sources) and ncu_<i>.ncu-rep per case.
set -o pipefail
ROOT=$1 CASES=${2:-aggressive:131072:1,default:131072:1} CONFIG=${3:-"{}"}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv; which ncu; ncu --version | tail -1; } \
  2>&1 | tee "$OUT/env.txt"
i=0
for case in ${CASES//,/ }; do
  i=$((i + 1))
  PYTHONPATH=$ROOT/src:$ROOT/benchmarks timeout 240 ncu --profile-from-start off --clock-control none \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section LaunchStats --section SourceCounters \
    --section ComputeWorkloadAnalysis --section InstructionStats \
    --export "$OUT/ncu_$i" --force-overwrite \
    python3 "$ROOT/benchmarks/kernel_ncu_gpu.py" --cases "$case" --config "$CONFIG" \
    > "$OUT/ncu_$i.log" 2>&1
  echo "case $case rc $?" | tee -a "$OUT/env.txt"
  ncu --import "$OUT/ncu_$i.ncu-rep" --page details --print-details all > "$OUT/ncu_$i.txt" 2>&1
done
