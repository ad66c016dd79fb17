#!/usr/bin/env bash
# Stop 22, H200, first call (< 6 min): one launch per step (merge), programmatic dependent launch (pdl) and
# shorter outlier / exact programs (short_rows), measured before any becomes a default.
#   A. (in parallel, CPU-bound compiles) compiled = reference (quickcheck) of the default preset's layouts
#      and a low-rank int4 layout with each new option, value bytes tokens-contiguous too; the stop-22 CUDA
#      tests; warm-up compiles of what B times;
#   B. side by side in one process per cell (graph replay beside SDPA): the default layout as the cache
#      stores it (channel_zp_vt) and the aggressive layout at 4K / 32K / 128K batch 1 and 128K batch 8:
#      two launches (today) vs merge, pdl, both, short_rows 64 / 128, all three.
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop22_scan.sh OUTDIR
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
set -f
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
mkdir -p "$W"/{qa,qv,w1,w2,c4,c32,c128,c128b8}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm --format=csv,noheader | tee "$W/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$W/env.txt"
echo "SPECTRALCACHE_COMMIT=${SPECTRALCACHE_COMMIT:-unset}" | tee -a "$W/env.txt"
git status --short -- src benchmarks tests | tee -a "$W/env.txt"
PIN='--v-block-t none --v-num-warps 4 --v-maxnreg=-1 --v-programs-per-sm none --v-block-stages none --v-outlier-split 1 --v-dequant-asm 1 --v-min-rows none --v-num-stages none --v-exact-spread 1 --v-int4-bytes 32 --v-int4-row-stride none --v-int4-pad 1 --v-blocks-per-split none --v-block-parts none --v-block-parts-min-tiles none --v-nibble-split none --v-int4-asm none --v-defer-den none --v-flat-tiles none --v-key-raw none --v-outlier-cols none --v-merge none --v-pdl none --v-short-rows none --v-ablate none'
EX='[{},{"merge":1},{"pdl":1},{"merge":1,"pdl":1},{"short_rows":64},{"short_rows":128},{"merge":1,"pdl":1,"short_rows":64}]'
CK='[{},{"merge":1},{"merge":1,"pdl":1},{"short_rows":64}]'
M='post_rope chK4zp idV4,pre_rope chK4zp idV4,post_rope k4,G8 b4,q4 pad'
timeout 170 python3 $K --out "$W/qa" --sections quickcheck --check-block-size 512 --check-modes "$M" \
  --check-configs "$CK" > "$W/qa/log" 2>&1 &
timeout 170 python3 $K --out "$W/qv" --sections quickcheck --check-block-size 512 --check-modes "post_rope chK4zp idV4,q4 pad" \
  --check-value-t --check-configs "$CK" > "$W/qv/log" 2>&1 &
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_triton_decode_cuda.py -k stop22 -rf \
  > "$W/gpu_tests.log" 2>&1 &
# shellcheck disable=SC2086
timeout 170 python3 $K --out "$W/w1" --sections variants --variant-cells 4096x1 $PIN \
  --variant-presets channel_zp_vt,aggressive --v-extra "$EX" > "$W/w1/log" 2>&1 &
# shellcheck disable=SC2086
timeout 170 python3 $K --out "$W/w2" --sections variants --variant-cells 32768x8 $PIN \
  --variant-presets channel_zp_vt,aggressive --v-extra "$EX" > "$W/w2/log" 2>&1 &
wait
grep -h "FAIL\|checks:" "$W/qa/log" "$W/qv/log"
tail -3 "$W/gpu_tests.log"
grep -h -A3 "Traceback" "$W"/q?/log "$W"/w?/log | head -30
echo "[A done $SECONDS s]"
var() {  # var OUT CELLS
  # shellcheck disable=SC2086
  timeout 75 python3 $K --out "$1" --sections variants --variant-cells "$2" $PIN \
    --variant-presets channel_zp_vt,aggressive --v-extra "$EX" > "$1/log" 2>&1
  grep -h "^variant  *[0-9]\|variant failed" "$1/log"
}
var "$W/c128" 131072x1
var "$W/c32" 32768x1
var "$W/c4" 4096x1
var "$W/c128b8" 131072x8
echo "[B done $SECONDS s]"
