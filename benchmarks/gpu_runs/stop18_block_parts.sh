#!/usr/bin/env bash
# Stop 18, H100: compiled quickcheck of the decode kernel with block parts (a cold block split over
# 2 / 4 programs) on the default layout (channel keys + zero points) and low-rank layouts, then a
# variant scan of block_parts none,1,2,4,8 (+ automatic with 1 tile per part) for channel_zp and the
# low-rank layout at 4K / 16K / 32K batch 1 and 4K batch 8, graph ms beside SDPA, other knobs pinned.
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop18_block_parts.sh OUTDIR
set -f
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
mkdir -p "$W/qa" "$W/qb" "$W/warm" "$W/scan"
PIN='--v-block-t none --v-num-warps 4 --v-maxnreg=-1 --v-programs-per-sm 4 --v-block-stages 0 --v-outlier-split 1 --v-dequant-asm 1 --v-min-rows none --v-num-stages none --v-exact-spread 1 --v-int4-bytes 32 --v-int4-row-stride 0 --v-int4-pad 1 --v-blocks-per-split none --v-block-parts none,1,2,4,8 --v-block-parts-min-tiles none --v-extra [{"block_parts_min_tiles":1}] --variant-presets channel_zp,default'
C='[{"block_parts":2},{"block_parts":4,"outlier_split":false},{"block_parts":4,"block_t":128}]'
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$W/env.txt"
timeout 110 python3 $K --out "$W/qa" --sections quickcheck --check-block-size 512 --check-configs "$C" \
  --check-modes 'post_rope chK4zp idV4,pre_rope chK4zp idV4' > "$W/qa/log" 2>&1 &
timeout 110 python3 $K --out "$W/qb" --sections quickcheck --check-block-size 512 --check-configs "$C" \
  --check-modes 'post_rope k4,pre_rope k8,pad mask' > "$W/qb/log" 2>&1 &
# shellcheck disable=SC2086
timeout 110 python3 $K --out "$W/warm" --sections variants --variant-cells 4096x1 $PIN > "$W/warm/log" 2>&1 &
wait
grep -h "^check\|checks:" "$W/qa/log" "$W/qb/log"
grep -h -A3 "Traceback" "$W/qa/log" "$W/qb/log" "$W/warm/log" | head -20
# shellcheck disable=SC2086
timeout 125 python3 $K --out "$W/scan" --sections variants --variant-cells 4096x1,16384x1,32768x1,4096x8 $PIN \
  > "$W/scan/log" 2>&1
grep "^variant  *[0-9]" "$W/scan/log" || grep "^variant ctx=\|variant failed" "$W/scan/log"
