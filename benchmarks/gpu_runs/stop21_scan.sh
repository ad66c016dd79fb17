#!/usr/bin/env bash
# Stop 21, H200, first call (< 9 min): the stop-21 kernel changes side by side, the ablations, and the
# automatic plan timed.
#   A. (in parallel, CPU-bound compiles) compiled = reference (quickcheck) of the default preset's
#      layouts at block 512 and 128 with the new defaults (outlier mask per tile column, paired int4
#      widening) and with each switched back; the same with the value bytes stored tokens-contiguous
#      (--check-value-t); low-rank int4 / int8 layouts; warm-up compiles of what B / C time;
#   B. side by side in one process per cell (graph replay beside SDPA): default layout (channel_zp) and the
#      tokens-contiguous value prototype (channel_zp_vt, a storage change: results right, see the dev
#      script) at 128K / 32K x batch 1 / 8 -- the new automatic plan, stop 20's kernel (int4_asm 1,
#      outlier_cols 0), each change alone, programs per SM 6 / 8; timing-only ablations (ABLATE bits:
#      1 value side, 2 key bytes, 4 outlier mask, 8 softmax; results wrong) of the default layout at
#      128K batch 1 / 8; aggressive at 128K x 1 / 8 and 32K x 8 (widening form, programs per SM);
#   C. copy bandwidth + time section (automatic plan) at 128K / 32K x batch 1 / 8.
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop21_scan.sh OUTDIR
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
set -f
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
mkdir -p "$W"/{qa,qb,qv,qc,w1,w2,w3,w4,v128k,v128k8,v32k,v32k8,ab1,ab8,agg,time}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm --format=csv,noheader | tee "$W/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$W/env.txt"
git log -1 --format='%H %s' 2>/dev/null | tee -a "$W/env.txt"
git status --short -- src benchmarks tests | tee -a "$W/env.txt"
PIN='--v-block-t none --v-num-warps 4 --v-maxnreg=-1 --v-programs-per-sm 4 --v-block-stages none --v-outlier-split 1 --v-dequant-asm 1 --v-min-rows none --v-num-stages none --v-exact-spread 1 --v-int4-bytes 32 --v-int4-row-stride none --v-int4-pad 1 --v-blocks-per-split none --v-block-parts none --v-block-parts-min-tiles none --v-nibble-split none --v-int4-asm none --v-defer-den none --v-flat-tiles none --v-key-raw none --v-outlier-cols none --v-ablate none'
ED='[{"int4_asm":1,"outlier_cols":0},{"int4_asm":1},{"outlier_cols":0},{"programs_per_sm":6},{"programs_per_sm":8}]'
EAB='[{"ablate":1},{"ablate":2},{"ablate":4},{"ablate":8},{"ablate":12},{"ablate":6},{"ablate":14},{"ablate":13}]'
EAG='[{"int4_asm":1},{"programs_per_sm":6},{"programs_per_sm":8}]'
J() { python3 -c "import json,sys; print(json.dumps([{}] + json.loads(sys.argv[1])))" "$1"; }
M='post_rope chK4zp idV4,pre_rope chK4zp idV4,post_rope chK4 idV4,post_rope idK4 idV,G8 b4,q4 pad'
M2='post_rope k4,pre_rope k4,post_rope k8,idV v4,softcap,pad mask'
QC='[{},{"int4_asm":1},{"outlier_cols":0}]'
timeout 150 python3 $K --out "$W/qa" --sections quickcheck --check-block-size 512 --check-modes "$M" \
  --check-configs "$QC" > "$W/qa/log" 2>&1 &
timeout 150 python3 $K --out "$W/qb" --sections quickcheck --check-block-size 128 --check-modes "$M" > "$W/qb/log" 2>&1 &
timeout 150 python3 $K --out "$W/qv" --sections quickcheck --check-block-size 512 --check-modes "$M" --check-value-t \
  > "$W/qv/log" 2>&1 &
timeout 150 python3 $K --out "$W/qc" --sections quickcheck --check-block-size 512 --check-modes "$M2" \
  --check-configs '[{},{"int4_asm":1}]' > "$W/qc/log" 2>&1 &
warm() {  # warm OUT PRESETS EXTRA
  # shellcheck disable=SC2086
  timeout 170 python3 $K --out "$1" --sections variants --variant-cells 4096x1,32768x8 $PIN --variant-presets "$2" \
    --v-extra "$3" > "$1/log" 2>&1 &
}
warm "$W/w1" channel_zp,channel_zp_vt "$(J "$ED")"
warm "$W/w2" channel_zp "$EAB"
warm "$W/w3" aggressive "$(J "$EAG")"
wait
grep -h "FAIL\|checks:" "$W/qa/log" "$W/qb/log" "$W/qv/log" "$W/qc/log"
grep -h -A3 "Traceback" "$W"/q?/log "$W"/w?/log | head -30
echo "[A done $SECONDS s]"
var() {  # var OUT CELLS PRESETS EXTRA
  # shellcheck disable=SC2086
  timeout 60 python3 $K --out "$1" --sections variants --variant-cells "$2" $PIN --variant-presets "$3" \
    --v-extra "$4" > "$1/log" 2>&1
  grep -h "^variant  *[0-9]\|variant failed" "$1/log"
}
var "$W/v128k" 131072x1 channel_zp,channel_zp_vt "$(J "$ED")"
var "$W/v128k8" 131072x8 channel_zp,channel_zp_vt "$(J "$ED")"
var "$W/ab1" 131072x1 channel_zp "$(J "$EAB")"
var "$W/ab8" 131072x8 channel_zp "$(J "$EAB")"
var "$W/agg" 131072x1,131072x8,32768x8 aggressive "$(J "$EAG")"
var "$W/v32k" 32768x1,32768x8 channel_zp,channel_zp_vt "$(J "$ED")"
echo "[B done $SECONDS s]"
timeout 100 python3 $K --out "$W/time" --sections copy,time --contexts 131072,32768 --batches 1,8 \
  --no-ref --time-presets channel_zp,aggressive,channel_zp_vt > "$W/time/log" 2>&1
grep -h "copy bandwidth\|^ *[0-9]* B[18] " "$W/time/log"
echo "[C done $SECONDS s]"
