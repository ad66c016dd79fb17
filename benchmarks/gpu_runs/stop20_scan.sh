#!/usr/bin/env bash
# Stop 20, H200, first call (< 6 min): where the decode kernel's time goes at >= 32K, and which launch
# plan is fastest, before any new kernel path is made the default.
#   1. compiled = reference (quickcheck) of the default preset's layouts (block 512 and 128) with this
#      tree's kernel (the folded query halves now rounded to float16 once per block), while warm-up
#      processes compile every variant of the scan (Triton's on-disk cache);
#   2. copy bandwidth, then the roofline section: a read-only Triton kernel streams the cold tier's
#      coefficient bytes with the decode kernel's grid (and 1/2x, 2x, 4x its programs) beside the kernel;
#   3. variant scan (CUDA-graph replay beside SDPA), default layout (channel_zp) at 4K / 32K / 128K
#      batch 1 and 32K / 128K batch 8: software-pipelining depth with and without the flat tile loop,
#      warps, tiles, register caps, programs per SM, and explicit blocks per program (the automatic plan
#      at 128K batch 1 launches ~73 programs per KV head for 66 resident slots, at batch 8 ~12 per
#      (row, head) for 8.25: a second partial wave); aggressive and lowrank layouts at 32K / 128K.
# Ran on the tree of 584678f (results: benchmarks/results/kernel_stop20/scan/); the automatic plan it
# pinned against has changed since (see that README).
# Usage (repo root, device machine): bash benchmarks/gpu_runs/stop20_scan.sh OUTDIR
set -f
# (no shell variable may be named CC: Triton compiles its launcher with $CC when it is exported)
W=${1:?output dir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src:$PWD
K=benchmarks/attention_kernel_dev.py
mkdir -p "$W"/{qa,qb,w1,w2,w3,w4,w5,w6,w7,roof,s4k,s32k,s128k,s32k8,s128k8,slr,slr8}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm --format=csv,noheader | tee "$W/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$W/env.txt"
git log -1 --format='%H %s' 2>/dev/null | tee -a "$W/env.txt"
git status --short -- src benchmarks tests | tee -a "$W/env.txt"
PIN='--v-block-t none --v-num-warps 4 --v-maxnreg=-1 --v-programs-per-sm 4 --v-block-stages none --v-outlier-split 1 --v-dequant-asm 1 --v-min-rows none --v-num-stages none --v-exact-spread 1 --v-int4-bytes 32 --v-int4-row-stride 0 --v-int4-pad 1 --v-blocks-per-split none --v-block-parts none --v-block-parts-min-tiles none --v-nibble-split none --v-int4-asm none --v-defer-den none --v-flat-tiles none'
NS2='"num_stages":2,"flat_tiles":0'
# default layout: kernels (each compiles once; the warm-up splits them over processes)
V_NS="[{\"flat_tiles\":0},{\"num_stages\":2},{$NS2},{\"num_stages\":3,\"flat_tiles\":0}]"
V_WARPS="[{\"num_warps\":2,\"programs_per_sm\":8},{\"num_warps\":2,\"programs_per_sm\":8,$NS2},{\"num_warps\":8,\"block_t\":128,$NS2}]"
V_REGS="[{\"maxnreg\":null,$NS2},{\"block_t\":128,\"maxnreg\":null},{\"num_warps\":1,\"block_t\":32,\"programs_per_sm\":16},{\"maxnreg\":96,\"programs_per_sm\":5}]"
V_PPS='[{"programs_per_sm":3},{"programs_per_sm":8}]'
# low-rank layouts (aggressive, lowrank = "default" in the dev script)
L_PIPE='[{"int4_row_stride":1},{"block_stages":2},{"block_stages":2,"int4_row_stride":1},{"num_stages":2}]'
L_TILES='[{"num_stages":2,"int4_row_stride":1},{"block_t":128},{"block_t":512},{"num_warps":8},{"programs_per_sm":3},{"programs_per_sm":8}]'
ALL_D="$(python3 -c "import json,sys; print(json.dumps(sum((json.loads(a) for a in sys.argv[1:]), [])))" "$V_NS" "$V_WARPS" "$V_REGS" "$V_PPS")"
ALL_L="$(python3 -c "import json,sys; print(json.dumps(sum((json.loads(a) for a in sys.argv[1:]), [])))" "$L_PIPE" "$L_TILES")"
M='post_rope chK4zp idV4,pre_rope chK4zp idV4,post_rope chK4 idV4,post_rope k4,G8 b4,q4 pad'
warm() {  # warm OUT PRESETS EXTRA
  # shellcheck disable=SC2086
  timeout 170 python3 $K --out "$1" --sections variants --variant-cells 4096x1 $PIN --variant-presets "$2" \
    --v-extra "$3" > "$1/log" 2>&1 &
}
timeout 120 python3 $K --out "$W/qa" --sections quickcheck --check-block-size 512 --check-modes "$M" > "$W/qa/log" 2>&1 &
timeout 120 python3 $K --out "$W/qb" --sections quickcheck --check-block-size 128 --check-modes "$M" > "$W/qb/log" 2>&1 &
warm "$W/w1" channel_zp "[{}]"
warm "$W/w2" channel_zp "$V_NS"
warm "$W/w3" channel_zp "$V_WARPS"
warm "$W/w4" channel_zp "$V_REGS"
warm "$W/w5" channel_zp "$V_PPS"
warm "$W/w6" aggressive,default "$L_PIPE"
warm "$W/w7" aggressive,default "$L_TILES"
wait
grep -h "FAIL\|checks:" "$W/qa/log" "$W/qb/log"
grep -h -A3 "Traceback" "$W"/qa/log "$W"/qb/log "$W"/w1/log "$W"/w2/log "$W"/w3/log "$W"/w4/log "$W"/w5/log "$W"/w6/log "$W"/w7/log | head -30
echo "[warm done $SECONDS s]"
timeout 60 python3 $K --out "$W/roof" --sections copy,roofline --variant-cells 131072x1,131072x8 \
  --variant-presets channel_zp,aggressive > "$W/roof/log" 2>&1
grep -h "copy bandwidth\|^roofline" "$W/roof/log"
echo "[roofline done $SECONDS s]"
scan() {  # scan OUT CELLS PRESETS EXTRA
  # shellcheck disable=SC2086
  timeout 90 python3 $K --out "$1" --sections variants --variant-cells "$2" $PIN --variant-presets "$3" \
    --v-extra "$4" > "$1/log" 2>&1
  grep -h "^variant  *[0-9]\|variant failed" "$1/log"
}
J() { python3 -c "import json,sys; print(json.dumps([{}] + json.loads(sys.argv[1]) + json.loads(sys.argv[2])))" "$1" "$2"; }
scan "$W/s128k" 131072x1 channel_zp "$(J "$ALL_D" "[{\"blocks_per_split\":5},{\"blocks_per_split\":6},{\"blocks_per_split\":5,$NS2}]")"
scan "$W/s128k8" 131072x8 channel_zp "$(J "$ALL_D" "[{\"blocks_per_split\":32},{\"blocks_per_split\":37},{\"blocks_per_split\":43},{\"blocks_per_split\":37,$NS2}]")"
scan "$W/s32k" 32768x1 channel_zp "$(J "$ALL_D" '[{"blocks_per_split":2}]')"
scan "$W/s32k8" 32768x8 channel_zp "$(J "$ALL_D" "[{\"blocks_per_split\":8},{\"blocks_per_split\":11},{\"blocks_per_split\":16},{\"blocks_per_split\":8,$NS2}]")"
scan "$W/s4k" 4096x1 channel_zp "$(J "$ALL_D" '[]')"
echo "[default-layout scan done $SECONDS s]"
scan "$W/slr" 32768x1,131072x1 aggressive,default "$(J "$ALL_L" '[]')"
scan "$W/slr8" 131072x8 aggressive,default "$(J "$ALL_L" '[]')"
echo "[all done $SECONDS s]"
