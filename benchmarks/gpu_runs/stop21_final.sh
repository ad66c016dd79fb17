#!/usr/bin/env bash
# Stop 21, H200, second (last) call (< 8 min): the committed automatic plan, measured.
#   A. (in parallel, CPU-bound compiles) compiled = reference (quickcheck) of the default preset's layouts at
#      block 512 with the automatic plan, with 128-token tiles and with flat_tiles 3, and with the value bytes stored
#      tokens-contiguous; warm-up compiles of what B and C time;
#   B. side by side in one process per cell (graph replay beside SDPA): default layout (channel_zp) and the
#      tokens-contiguous value prototype (channel_zp_vt) at 128K batch 1 / 8 -- the automatic plan against
#      each block's setup data loaded one block ahead (flat_tiles 3), 128-token tiles (fewer, larger tiles: 1047 instructions per 128 tokens against 2 x 585), the outlier
#      mask per tile column forced on / off, 3 pipeline stages at batch 1; low-rank layouts (aggressive,
#      lowrank) at 128K batch 8 with 4 / 8 programs per SM;
#   C. copy bandwidth + time section (automatic plan) at 4K / 32K / 128K x batch 1 / 8 for the default,
#      aggressive, lowrank and tokens-contiguous-value layouts.
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop21_final.sh OUTDIR
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
set -f
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
mkdir -p "$W"/{qa,qv,w1,w2,w3,w4,v128k,v128k8,vlr8,time}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm --format=csv,noheader | tee "$W/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$W/env.txt"
git log -1 --format='%H %s' 2>/dev/null | tee -a "$W/env.txt"
git status --short -- src benchmarks tests | tee -a "$W/env.txt"
PIN='--v-block-t none --v-num-warps 4 --v-maxnreg=-1 --v-programs-per-sm none --v-block-stages none --v-outlier-split 1 --v-dequant-asm 1 --v-min-rows none --v-num-stages none --v-exact-spread 1 --v-int4-bytes 32 --v-int4-row-stride none --v-int4-pad 1 --v-blocks-per-split none --v-block-parts none --v-block-parts-min-tiles none --v-nibble-split none --v-int4-asm none --v-defer-den none --v-flat-tiles none --v-key-raw none --v-outlier-cols none --v-ablate none'
E1='[{"flat_tiles":3},{"block_t":128},{"block_t":128,"outlier_cols":1},{"outlier_cols":1},{"num_stages":3}]'
E8='[{"flat_tiles":3},{"block_t":128},{"block_t":128,"outlier_cols":0},{"outlier_cols":0}]'
ELR='[{"programs_per_sm":4},{"programs_per_sm":8}]'
J() { python3 -c "import json,sys; print(json.dumps([{}] + json.loads(sys.argv[1])))" "$1"; }
M='post_rope chK4zp idV4,pre_rope chK4zp idV4,post_rope chK4 idV4,post_rope idK4 idV,G8 b4,q4 pad'
timeout 150 python3 $K --out "$W/qa" --sections quickcheck --check-block-size 512 --check-modes "$M" \
  --check-configs '[{},{"block_t":128},{"flat_tiles":3}]' > "$W/qa/log" 2>&1 &
timeout 150 python3 $K --out "$W/qv" --sections quickcheck --check-block-size 512 --check-modes "$M" --check-value-t \
  > "$W/qv/log" 2>&1 &
warm() {  # warm OUT PRESETS EXTRA
  # shellcheck disable=SC2086
  timeout 150 python3 $K --out "$1" --sections variants --variant-cells 4096x1,32768x8 $PIN --variant-presets "$2" \
    --v-extra "$3" > "$1/log" 2>&1 &
}
warm "$W/w1" channel_zp,channel_zp_vt "$(J "$E1")"
warm "$W/w2" channel_zp,channel_zp_vt "$E8"
warm "$W/w3" aggressive,default "$(J "$ELR")"
timeout 150 python3 $K --out "$W/w4" --sections time --contexts 4096 --batches 1,8 --no-ref \
  --time-presets channel_zp,aggressive,default,channel_zp_vt > "$W/w4/log" 2>&1 &
wait
grep -h "FAIL\|checks:" "$W/qa/log" "$W/qv/log"
grep -h -A3 "Traceback" "$W"/q?/log "$W"/w?/log | head -30
echo "[A done $SECONDS s]"
var() {  # var OUT CELLS PRESETS EXTRA
  # shellcheck disable=SC2086
  timeout 60 python3 $K --out "$1" --sections variants --variant-cells "$2" $PIN --variant-presets "$3" \
    --v-extra "$4" > "$1/log" 2>&1
  grep -h "^variant  *[0-9]\|variant failed" "$1/log"
}
var "$W/v128k" 131072x1 channel_zp,channel_zp_vt "$(J "$E1")"
var "$W/v128k8" 131072x8 channel_zp,channel_zp_vt "$(J "$E8")"
var "$W/vlr8" 131072x8 aggressive,default "$(J "$ELR")"
echo "[B done $SECONDS s]"
timeout 150 python3 $K --out "$W/time" --sections copy,time --contexts 131072,32768,4096 --batches 1,8 \
  --no-ref --time-presets channel_zp,aggressive,default,channel_zp_vt > "$W/time/log" 2>&1
grep -h "copy bandwidth\|^ *[0-9]* B[18] " "$W/time/log"
echo "[C done $SECONDS s]"
