#!/usr/bin/env bash
# Stop 20, H200, last call (< 7 min): the committed automatic plan, measured.
#   A. (in parallel, CPU-bound compiles) the CUDA tests in tests/gpu (pytest-xdist, 6 workers); compiled =
#      reference (quickcheck) of the default preset's layouts at block 512 (automatic plan, and the
#      trans_tile variant) and 128, and of low-rank int4 / int8 layouts; warm-up compiles of what B and C
#      time (Triton's on-disk cache);
#   B. copy bandwidth + time section: 4K / 16K / 32K / 128K x batch 1 / 8, default (channel_zp), aggressive
#      and lowrank ("default" in the dev script) layouts, automatic plan, graph replay beside SDPA;
#   C. side by side in one process per cell (128K batch 1 and 8; the call is kept under ~6 min to leave
#      the team device time): the automatic plan against this stop's changes switched off
#      (key_raw 0; num_stages 3 = Triton's default; blocks_per_split of the stop-19 rounding at batch 8;
#      block_stages 0 + byte row strides for the low-rank layouts) and the trans_tile variant; programs
#      per SM 3 / 8 for the low-rank layouts.
# Ran at f162182 (results: benchmarks/results/kernel_stop20/final/). Since then the trans_tile option is
# gone (measured 26-45 % slower: its checks and variants now fail as unknown options) and key_raw is off by
# default, so the automatic plan no longer includes it; drop those entries to rerun on a later tree.
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop20_final.sh OUTDIR
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
set -f
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
mkdir -p "$W"/{tests,qa,qb,qc,w1,w2,w3,time,v128k,v128k8,v32k,v4k,vlr}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm --format=csv,noheader | tee "$W/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$W/env.txt"
git log -1 --format='%H %s' 2>/dev/null | tee -a "$W/env.txt"
git status --short -- src benchmarks tests | tee -a "$W/env.txt"
PIN='--v-block-t none --v-num-warps 4 --v-maxnreg=-1 --v-programs-per-sm 4 --v-block-stages none --v-outlier-split 1 --v-dequant-asm 1 --v-min-rows none --v-num-stages none --v-exact-spread 1 --v-int4-bytes 32 --v-int4-row-stride none --v-int4-pad 1 --v-blocks-per-split none --v-block-parts none --v-block-parts-min-tiles none --v-nibble-split none --v-int4-asm none --v-defer-den none --v-flat-tiles none --v-key-raw none --v-trans-tile none'
E128='[{"key_raw":0},{"num_stages":3},{"key_raw":0,"num_stages":3},{"trans_tile":1}]'
E128B8='[{"key_raw":0},{"blocks_per_split":29},{"key_raw":0,"blocks_per_split":29},{"trans_tile":1}]'
E32='[{"key_raw":0,"num_stages":3},{"trans_tile":1}]'
E4='[{"num_stages":3},{"key_raw":0,"num_stages":3},{"trans_tile":1}]'
ELR='[{"block_stages":0,"int4_row_stride":0},{"programs_per_sm":3},{"programs_per_sm":8}]'
J() { python3 -c "import json,sys; print(json.dumps([{}] + json.loads(sys.argv[1])))" "$1"; }
M='post_rope chK4zp idV4,pre_rope chK4zp idV4,post_rope chK4 idV4,post_rope idK4 idV,G8 b4,q4 pad'
M2='post_rope k4,pre_rope k4,post_rope k8,idV v4,softcap,pad mask'
timeout 150 python3 -m pytest -q -n 6 tests/gpu -p no:cacheprovider --timeout 145 > "$W/tests/log" 2>&1 &
timeout 120 python3 $K --out "$W/qa" --sections quickcheck --check-block-size 512 --check-modes "$M" \
  --check-configs '[{},{"trans_tile":1}]' > "$W/qa/log" 2>&1 &
timeout 120 python3 $K --out "$W/qb" --sections quickcheck --check-block-size 128 --check-modes "$M" > "$W/qb/log" 2>&1 &
timeout 120 python3 $K --out "$W/qc" --sections quickcheck --check-block-size 512 --check-modes "$M2" > "$W/qc/log" 2>&1 &
# shellcheck disable=SC2086
timeout 120 python3 $K --out "$W/w1" --sections variants --variant-cells 4096x1 $PIN --variant-presets channel_zp \
  --v-extra "[{},{\"key_raw\":0},{\"num_stages\":3},{\"key_raw\":0,\"num_stages\":3},{\"trans_tile\":1}]" > "$W/w1/log" 2>&1 &
# shellcheck disable=SC2086
timeout 120 python3 $K --out "$W/w2" --sections variants --variant-cells 4096x1 $PIN --variant-presets aggressive,default \
  --v-extra "$(J "$ELR")" > "$W/w2/log" 2>&1 &
timeout 120 python3 $K --out "$W/w3" --sections time --contexts 4096 --batches 1,8 --no-ref \
  --time-presets channel_zp,aggressive,default > "$W/w3/log" 2>&1 &
wait
grep -h "FAIL\|checks:" "$W/qa/log" "$W/qb/log" "$W/qc/log"
tail -4 "$W/tests/log"
grep -h -A3 "Traceback" "$W"/qa/log "$W"/qb/log "$W"/qc/log "$W"/w1/log "$W"/w2/log "$W"/w3/log | head -30
echo "[A done $SECONDS s]"
timeout 120 python3 $K --out "$W/time" --sections copy,time --contexts 131072,32768,16384,4096 --batches 1,8 \
  --no-ref --time-presets channel_zp,aggressive,default > "$W/time/log" 2>&1
grep -h "copy bandwidth\|^ *[0-9]* B[18] " "$W/time/log"
echo "[B done $SECONDS s]"
var() {  # var OUT CELLS PRESETS EXTRA
  # shellcheck disable=SC2086
  timeout 40 python3 $K --out "$1" --sections variants --variant-cells "$2" $PIN --variant-presets "$3" \
    --v-extra "$4" > "$1/log" 2>&1
  grep -h "^variant  *[0-9]\|variant failed" "$1/log"
}
var "$W/v128k" 131072x1 channel_zp "$(J "$E128")"
var "$W/v128k8" 131072x8 channel_zp "$(J "$E128B8")"
var "$W/vlr" 131072x1,131072x8 aggressive,default "$(J "$ELR")"
echo "[C done $SECONDS s]"
