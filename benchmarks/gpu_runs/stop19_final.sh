#!/usr/bin/env bash
# Stop 19, H200, last call (< 5 min): the committed automatic plan (nibble split, PTX int4 widening,
# deferred sums; flat tile loop for 512-token blocks, pipelined block loop for 128-token ones).
#   1. compiled = reference (quickcheck) of the default layouts at block 128 and 512 under the automatic
#      plan, while the timed kernels compile (Triton's on-disk cache);
#   2. time section (copy bandwidth; kernel eager / graph beside SDPA; torch reference error <= 32K):
#      channel_zp and channel_zp_b128 at 4K..128K x batch 1 / 8, then the low-rank ("default" in the dev
#      script) and aggressive layouts at 128K;
#   3. combinations the first scan did not time (next stop's leads), 128K batch 1 / 8.
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop19_final.sh OUTDIR
set -f
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
mkdir -p "$W/qa" "$W/qb" "$W/warm" "$W/warm2" "$W/time" "$W/time_lr" "$W/combo"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm --format=csv,noheader | tee "$W/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$W/env.txt"
PIN='--v-block-t none --v-num-warps 4 --v-maxnreg=-1 --v-programs-per-sm 4 --v-block-stages none --v-outlier-split 1 --v-dequant-asm 1 --v-min-rows none --v-num-stages none --v-exact-spread 1 --v-int4-bytes 32 --v-int4-row-stride 0 --v-int4-pad 1 --v-blocks-per-split none --v-block-parts none --v-block-parts-min-tiles none --v-nibble-split none --v-int4-asm none --v-defer-den none --v-flat-tiles none'
COMBO='[{"flat_tiles":0},{"num_stages":2},{"flat_tiles":0,"num_stages":2},{"block_t":128,"maxnreg":null},{"block_t":128,"maxnreg":null,"flat_tiles":0},{"block_stages":2,"num_stages":2}]'
M='post_rope chK4zp idV4,pre_rope chK4zp idV4,post_rope chK4 idV4,post_rope k4,G8 b4,q4 pad'
timeout 90 python3 $K --out "$W/qa" --sections quickcheck --check-block-size 128 --check-modes "$M" > "$W/qa/log" 2>&1 &
timeout 90 python3 $K --out "$W/qb" --sections quickcheck --check-block-size 512 --check-modes "$M" > "$W/qb/log" 2>&1 &
timeout 90 python3 $K --out "$W/warm" --sections time --contexts 4096 --batches 1 --no-ref \
  --time-presets channel_zp,channel_zp_b128,default,aggressive > "$W/warm/log" 2>&1 &
# shellcheck disable=SC2086
timeout 90 python3 $K --out "$W/warm2" --sections variants --variant-cells 4096x1 $PIN \
  --variant-presets channel_zp,channel_zp_b128 --v-extra "$COMBO" > "$W/warm2/log" 2>&1 &
wait
grep -h "FAIL\|checks:" "$W/qa/log" "$W/qb/log"
grep -h -A3 "Traceback" "$W"/q?/log "$W"/warm*/log | head -30
timeout 100 python3 $K --out "$W/time" --sections copy,time --contexts 4096,16384,32768,131072 \
  --batches 1,8 --time-presets channel_zp,channel_zp_b128 > "$W/time/log" 2>&1
timeout 35 python3 $K --out "$W/time_lr" --sections copy,time --contexts 131072 --batches 1,8 --no-ref \
  --time-presets default,aggressive > "$W/time_lr/log" 2>&1
grep -h "copy bandwidth\|^ *[0-9]* B[18] " "$W/time/log" "$W/time_lr/log"
# shellcheck disable=SC2086
timeout 45 python3 $K --out "$W/combo" --sections variants --variant-cells 131072x1,131072x8 $PIN \
  --variant-presets channel_zp,channel_zp_b128 --v-extra "$COMBO" > "$W/combo/log" 2>&1
grep -h "^variant  *[0-9]\|variant failed" "$W/combo/log"
